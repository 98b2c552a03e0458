//! The bitbucket verifier and parser on arbitrary headers and bytes: never panics, and a forged
//! input never verifies.
#![no_main]

use aiwg_webhook::platform::bitbucket;
use aiwg_webhook::Secret;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let (headers, body) = common::split(
        data,
        &[
            ("x-event-key", "pullrequest:comment_created"),
            ("x-hub-signature", "sha256=00"),
        ],
    );
    assert!(bitbucket::verify(&Secret::new("fuzz-secret"), &headers, body).is_err());
    // The parser is only reached after a good signature; it must not panic either.
    let _ = bitbucket::parse(&headers, body);
});
