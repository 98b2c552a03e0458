//! `sandbox: bwrap` without bubblewrap installed is a configuration error naming the key. One
//! test in its own binary: it empties `PATH` of this process.

use aiwg_agents::config::AgentsConfig;
use serde_json::json;

#[test]
fn sandbox_bwrap_without_bwrap_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    // `setpriv` is still found (it is asked for by default), `bwrap` is not.
    if let Some(setpriv) = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("setpriv"))
            .find(|c| c.is_file())
    }) {
        std::os::unix::fs::symlink(setpriv, dir.path().join("setpriv")).unwrap();
    }
    std::env::set_var("PATH", dir.path());
    let err = AgentsConfig::from_value(&json!({"sbx": {"kind": "command", "sandbox": "bwrap"}}))
        .unwrap()
        .build()
        .unwrap_err();
    assert_eq!(err.key, "agents.sbx.sandbox");
    assert!(err.reason.contains("bubblewrap"), "{err}");
}
