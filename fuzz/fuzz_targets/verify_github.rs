//! The github verifier and parser on arbitrary headers and bytes: never panics, and a forged
//! input never verifies.
#![no_main]

use aiwg_webhook::platform::github;
use aiwg_webhook::Secret;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let (headers, body) = common::split(
        data,
        &[
            ("x-github-event", "issue_comment"),
            ("x-hub-signature-256", "sha256=00"),
        ],
    );
    assert!(github::verify(&Secret::new("fuzz-secret"), &headers, body).is_err());
    // The parser is only reached after a good signature; it must not panic either.
    let _ = github::parse(&headers, body);
});
