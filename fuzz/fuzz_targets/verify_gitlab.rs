//! The GitLab verifier (token, then Standard Webhooks signing) and parser on arbitrary
//! headers and bytes.
#![no_main]

use aiwg_webhook::platform::{gitlab, standard};
use aiwg_webhook::Secret;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let (headers, body) = common::split(
        data,
        &[("x-gitlab-event", "Note Hook"), ("x-gitlab-token", "guess")],
    );
    let token = Secret::new("fuzz-token-that-is-not-guessable");
    let key =
        standard::SigningKey::from_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("key");
    assert!(gitlab::verify(&token, Some(&key), &headers, body, 1_700_000_000).is_err());
    let _ = gitlab::verify(&Secret::new(""), Some(&key), &headers, body, 1_700_000_000);
    let _ = gitlab::parse(&headers, body);
});
