//! What the server binaries share: reading the configuration from `--config` / `AIWG_CONFIG`
//! (or the embedded defaults), logging, the start-up banner, and waiting for SIGINT/SIGTERM.

use aiwg_core::config::Config;

use crate::App;

/// The server's helper commands, run instead of the server when the first argument names one:
///
/// - `hash-key`: reads an API key from standard input (never from the command line, where
///   other users see it) and prints its hex SHA-256, for `key_sha256` in `auth.api_keys`;
/// - `gen-secret-key [ID]`: prints a new `AIWG_SECRET_KEY` entry (`ID:<base64 of 32 random
///   bytes>`, `ID` defaulting to `k` and today's date) for sealing secrets in PostgreSQL.
///
/// Returns the exit code when a command ran, `None` when the server should start.
#[must_use]
pub fn helper_command() -> Option<std::process::ExitCode> {
    use std::io::BufRead;
    use std::process::ExitCode;

    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("hash-key") => {
            let mut line = String::new();
            if let Err(e) = std::io::stdin().lock().read_line(&mut line) {
                eprintln!("aiwg: cannot read the key from standard input: {e}");
                return Some(ExitCode::from(2));
            }
            let key = line.trim_end_matches(['\r', '\n']);
            if key.chars().count() < 16 {
                eprintln!(
                    "aiwg: an API key must be at least 16 characters (give it on standard input)"
                );
                return Some(ExitCode::from(2));
            }
            println!("{}", aiwg_core::http::ApiKey::hash_hex(key));
            Some(ExitCode::SUCCESS)
        }
        Some("gen-secret-key") => {
            let id = args
                .get(1)
                .cloned()
                .unwrap_or_else(|| format!("k{}", chrono::Utc::now().format("%Y%m%d")));
            let entry = aiwg_core::secrets::SecretKeyring::generate(&id);
            if let Err(e) = aiwg_core::secrets::SecretKeyring::parse(&entry) {
                eprintln!("aiwg: {e}");
                return Some(ExitCode::from(2));
            }
            println!("{entry}");
            Some(ExitCode::SUCCESS)
        }
        _ => None,
    }
}

/// The configuration and where it came from: `--config PATH`, `AIWG_CONFIG`, or the embedded
/// defaults. `bin` names the program in the usage text.
pub fn load_config(bin: &str) -> Result<(String, Config), String> {
    let mut args = std::env::args().skip(1);
    let mut path = std::env::var("AIWG_CONFIG").ok().filter(|p| !p.is_empty());
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" | "-c" => path = Some(args.next().ok_or("--config needs a path")?),
            a if a.starts_with("--config=") => path = Some(a["--config=".len()..].to_owned()),
            "--help" | "-h" => {
                println!(
                    "usage: {bin} [--config PATH]   (or AIWG_CONFIG=PATH)\n       \
                     {bin} hash-key              (the API key on standard input; prints its SHA-256)\n       \
                     {bin} gen-secret-key [ID]   (prints a new AIWG_SECRET_KEY entry)"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument `{other}` (try --help)")),
        }
    }
    match path {
        Some(p) => Config::from_file(std::path::Path::new(&p))
            .map(|c| (p, c))
            .map_err(|e| e.to_string()),
        None => Config::from_yaml(crate::DEFAULT_CONFIG)
            .map(|c| ("(embedded defaults)".to_owned(), c))
            .map_err(|e| e.to_string()),
    }
}

/// Makes this process non-dumpable (`prctl(PR_SET_DUMPABLE, 0)`): no core dumps, and a process
/// of the same user — an agent run without a sandbox, say — can no longer read
/// `/proc/<server>/environ`, `/proc/<server>/mem` or attach a debugger to the server. Call it
/// first thing at start, before any secret is read.
pub fn make_non_dumpable() {
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        eprintln!("aiwg: cannot make the process non-dumpable: {e}");
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
}

/// Prints the address, the development key (when one was generated) and a `curl` line that
/// runs a demo workflow; logs what was skipped.
pub fn print_banner(app: &App, addr: &str, framework: &str, source: &str) {
    for s in &app.skipped {
        tracing::warn!("{s}");
    }
    println!("aiwg listening on http://{addr} ({framework}, config: {source})");
    if app.api.serves(aiwg_core::http::Route::Dashboard) {
        println!("dashboard: http://{addr}/ui/");
    }
    let key_hint = match &app.generated_key {
        Some(k) => {
            println!("development API key (admin): {k}");
            k.clone()
        }
        None => "$AIWG_API_KEY".to_owned(),
    };
    let workflows: Vec<String> = app
        .engine
        .catalog()
        .iter()
        .map(|w| w.name.clone())
        .collect();
    println!("workflows: {}", workflows.join(", "));
    if let Some(demo) = workflows
        .iter()
        .find(|w| *w == "repo-files")
        .or(workflows.first())
    {
        println!(
            "try: curl -s -X POST http://{addr}/workflows/trigger -H 'Authorization: Bearer {key_hint}' -H 'Content-Type: application/json' -d '{{\"workflow\":\"{demo}\",\"async\":false}}'"
        );
    }
}

/// Resolves at SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
