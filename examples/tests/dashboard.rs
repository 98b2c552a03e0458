//! The dashboard in a real browser: the release-style example server started as a process on
//! loopback, and `tests/ui/e2e.mjs` driving headless Chromium (Debian's `chromium`) through
//! Playwright (`playwright-core`, installed by `scripts/install-peers.sh` into `.peers/`).
//!
//! The axum server gets the whole script (sign in, trigger from the form and follow the log to
//! `completed`, cancel, live list, lost streams resumed with `Last-Event-ID`, subscriptions and
//! deliveries, a read-only key, markup shown as text, screenshots of every page at 1280 and
//! 390 px under `target/ui-screenshots/`, no console errors); the actix-web server the part
//! that proves it serves the same page and streams, with the page under `/aiwg/` (the script's
//! proxy mounts it there, as a reverse proxy would) so its relative URLs are put to the test.
//!
//! Without node, chromium or playwright-core the tests say so and pass, except in CI
//! (`CI=true`), where that is a failure.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Instant;

/// The admin key of the test server.
const ADMIN_KEY: &str = "e2e-admin-key-0123456789abcdef";
/// A key with only the `read` scope.
const READ_KEY: &str = "e2e-viewer-key-0123456789abcdef";

struct Browser {
    node: PathBuf,
    playwright: PathBuf,
    chromium: PathBuf,
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// The browser tooling, or why it is missing.
fn browser() -> Result<Browser, String> {
    let node = on_path("node").ok_or("node is not installed")?;
    let playwright = std::env::var_os("AIWG_TEST_PLAYWRIGHT")
        .map(PathBuf::from)
        .filter(|p| p.join("package.json").is_file())
        .ok_or("AIWG_TEST_PLAYWRIGHT does not name playwright-core (run scripts/install-peers.sh and source .peers/env)")?;
    let chromium = std::env::var_os("AIWG_TEST_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if !chromium.is_file() {
        return Err(format!("{} is not installed", chromium.display()));
    }
    Ok(Browser {
        node,
        playwright,
        chromium,
    })
}

fn skip_or_fail(why: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("the browser test cannot run in CI: {why}");
    }
    eprintln!("skipped: {why}");
}

fn config(dir: &Path) -> String {
    format!(
        r#"
server: {{ bind: "127.0.0.1:0" }}
auth:
  api_keys:
    - {{ name: ops, key: "{ADMIN_KEY}", scopes: [admin] }}
    - {{ name: viewer, key: "{READ_KEY}", scopes: [read] }}
projects: {{ root: "{root}" }}
engine: {{ workers: 4, shutdown_grace: "200ms" }}
agents:
  sh: {{ kind: command }}
workflows:
  greet:
    description: Greet someone, line by line
    parameters:
      - {{ name: who, description: "Whom to greet (lower-case letters)", required: true, pattern: "[a-z]{{1,20}}" }}
      - {{ name: mood, description: "How", choices: [calm, happy], default: calm }}
    steps:
      - {{ name: hello, agent: sh, command: ["sh", "-c", "for i in 1 2 3; do echo \"hello $1 ($2) line $i\"; done", "greet", "{{{{who}}}}", "{{{{mood}}}}"] }}
      - {{ name: bye, agent: sh, command: ["echo", "goodbye {{{{who}}}}"] }}
  slow:
    description: Runs until cancelled
    steps:
      - {{ name: wait, agent: sh, command: ["sh", "-c", "echo started; exec sleep 300"] }}
  gated:
    description: Waits for a person's approval before shipping
    approval_timeout: 1h
    steps:
      - {{ name: ship, agent: sh, command: ["echo", "shipped"], approval: required }}
  ticker:
    description: "Prints twelve ticks, half a second apart"
    steps:
      - {{ name: tick, agent: sh, command: ["sh", "-c", "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do echo tick $i; sleep 0.5; done"] }}
  broken:
    description: Fails on purpose
    steps:
      - {{ name: try, agent: sh, command: ["sh", "-c", "echo trying; echo 'no such thing' >&2; exit 3"] }}
  markup:
    description: "Prints <i>markup</i> and <script>window.__pwned=5</script>"
    steps:
      - {{ name: print, agent: sh, command: ["printf", "%s\n", '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=1">', "{{{{guidance}}}}"] }}
webhooks: {{ retry: ["1s", "1s", "1s"], allow_private_targets: true }}
"#,
        root = dir.display()
    )
}

/// The workspace's `target/ui-screenshots/`.
fn screenshots() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    target.join("ui-screenshots")
}

/// Runs the browser script against `bin` (`full` or `smoke`) and fails if it fails.
fn run(bin: &str, suite: &str) {
    let tools = match browser() {
        Ok(t) => t,
        Err(why) => return skip_or_fail(&why),
    };
    let dir = tempfile::tempdir().unwrap();
    let server = support::start(bin, &config(dir.path()), dir.path());
    let shots = screenshots();
    std::fs::create_dir_all(&shots).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui/e2e.mjs");
    let started = Instant::now();
    let out = Command::new(&tools.node)
        .arg(&script)
        .env("AIWG_E2E_BASE", &server.base)
        .env("AIWG_E2E_ADMIN_KEY", ADMIN_KEY)
        .env("AIWG_E2E_READ_KEY", READ_KEY)
        .env("AIWG_E2E_SUITE", suite)
        .env("AIWG_E2E_SCREENSHOTS", &shots)
        .env("AIWG_E2E_TIMEOUT_MS", "240000")
        .env("AIWG_TEST_PLAYWRIGHT", &tools.playwright)
        .env("AIWG_TEST_CHROMIUM", &tools.chromium)
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        out.status.success(),
        "the browser script failed after {:?} ({}); its output is above",
        started.elapsed(),
        out.status
    );
    assert!(
        stdout.contains(&format!("e2e {suite}: all checks passed")),
        "the script did not finish"
    );
    drop(server);
}

/// One browser at a time: the machine running the tests may be small.
static BROWSER: Mutex<()> = Mutex::new(());

#[test]
fn the_dashboard_works_in_a_real_browser_on_axum() {
    let _one = BROWSER.lock().unwrap_or_else(|e| e.into_inner());
    run(env!("CARGO_BIN_EXE_server"), "full");
}

#[test]
fn the_dashboard_works_in_a_real_browser_on_actix() {
    let _one = BROWSER.lock().unwrap_or_else(|e| e.into_inner());
    run(env!("CARGO_BIN_EXE_actix_server"), "smoke");
}
