//! What the process tests share: the example server binaries started as real processes on a
//! loopback port, with a config written to a temporary folder.

#![allow(dead_code)] // each test file uses its own part

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::mpsc;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::ConnectOptions;

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
    start_with(bin, config, dir, &[])
}

/// [`start`] with more environment variables.
pub(crate) fn start_with(
    bin: &str,
    config: &str,
    dir: &std::path::Path,
    env: &[(&str, &str)],
) -> Server {
    let path = dir.join("aiwg.yaml");
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(bin)
        .envs(env.iter().copied())
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

/// A database of its own for one test, dropped at the end.
pub(crate) struct Db {
    pub(crate) admin: sqlx::PgPool,
    pub(crate) name: String,
    pub(crate) url: String,
}

impl Db {
    /// A fresh database, or `None` (after saying why) without PostgreSQL outside CI.
    pub(crate) async fn create() -> Option<Db> {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        let base = std::env::var("AIWG_TEST_DATABASE_URL")
            .ok()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".into());
        let options = PgConnectOptions::from_str(&base).expect("a PostgreSQL URL");
        let admin = match PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.clone())
            .await
        {
            Ok(p) => p,
            Err(e) if ci => panic!("PostgreSQL is required in CI: {e}"),
            Err(e) => {
                eprintln!("skipping: no PostgreSQL ({e}); set AIWG_TEST_DATABASE_URL");
                return None;
            }
        };
        let name = format!("aiwg_mi_{}", uuid_like());
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .expect("create database");
        let url = options.database(&name).to_url_lossy().to_string();
        Some(Db { admin, name, url })
    }

    /// Drops the database.
    pub(crate) async fn drop(self) {
        let _ = sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&self.admin)
        .await;
    }
}

fn uuid_like() -> String {
    // Tests of one process may ask in the same clock tick: the counter tells them apart.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{:x}_{}_{n}", nanos, std::process::id())
}

/// Follows a job's events on the server at `base` until `pred` holds for an event (or the stream ends).
pub(crate) async fn follow(
    c: &reqwest::Client,
    base: &str,
    key: &str,
    id: &str,
    mut pred: impl FnMut(&Value) -> bool,
) -> Vec<Value> {
    let res = c
        .get(format!("{base}/workflows/{id}/events"))
        .bearer_auth(key)
        .send()
        .await
        .expect("events");
    let mut stream = res.bytes_stream();
    let mut buf = String::new();
    let mut seen = Vec::new();
    loop {
        while let Some(pos) = buf.find("\n\n") {
            let block: String = buf.drain(..pos + 2).collect();
            if let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: ")) {
                let v: Value = serde_json::from_str(data).unwrap();
                let stop = pred(&v);
                seen.push(v);
                if stop {
                    return seen;
                }
            }
        }
        match tokio::time::timeout(Duration::from_secs(60), stream.next()).await {
            Ok(Some(Ok(chunk))) => buf.push_str(&String::from_utf8_lossy(&chunk)),
            _ => return seen,
        }
    }
}

/// The path a peer test needs, from `var`. Missing: `None` with a note, or a panic under CI.
pub(crate) fn peer(var: &str) -> Option<std::path::PathBuf> {
    match std::env::var_os(var) {
        Some(p) if !p.is_empty() => Some(std::path::PathBuf::from(p)),
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
