//! The Standard Webhooks verifier (generic endpoint, GitLab signing), the generic parser and
//! the `whsec_` key decoder on arbitrary input.
#![no_main]

use aiwg_webhook::platform::{generic, standard};
use aiwg_webhook::Secret;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let (headers, body) = common::split(
        data,
        &[
            ("webhook-id", "msg_1"),
            ("webhook-timestamp", "1700000000"),
            ("webhook-signature", "v1,AAAA"),
        ],
    );
    let key =
        standard::SigningKey::from_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("key");
    assert!(standard::verify(&key, &headers, body, 1_700_000_000).is_err());
    assert!(generic::verify(
        None,
        &Secret::new("fuzz-bearer-token-unguessable"),
        &headers,
        body,
        0
    )
    .is_err());
    let _ = generic::parse(&headers, body);
    if let Ok(text) = std::str::from_utf8(body) {
        let _ = standard::SigningKey::from_secret(text);
    }
});
