//! The Slack verifier and parser (form and JSON bodies) on arbitrary headers and bytes.
#![no_main]

use aiwg_webhook::platform::slack;
use aiwg_webhook::Secret;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let (headers, body) = common::split(
        data,
        &[
            ("x-slack-request-timestamp", "1531420618"),
            ("x-slack-signature", "v0=00"),
        ],
    );
    let secret = Secret::new("8f742231b10e8888abcd99yyyzzz85a5");
    assert!(slack::verify(&secret, &headers, body, 1_531_420_618).is_err());
    let _ = slack::verify(&secret, &headers, body, i64::MIN);
    let _ = slack::verify(&secret, &headers, body, i64::MAX);
    let _ = slack::parse(&headers, body);
});
