//! The Discord Ed25519 verifier and interaction parser on arbitrary headers and bytes.
#![no_main]

use aiwg_webhook::platform::discord;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let (headers, body) = common::split(
        data,
        &[
            ("x-signature-ed25519", "00"),
            ("x-signature-timestamp", "1700000000"),
        ],
    );
    // RFC 8032 test 1 public key.
    let key =
        discord::public_key("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
            .expect("key");
    assert!(discord::verify(&key, &headers, body).is_err());
    let _ = discord::parse(&headers, body);
    if let Ok(text) = std::str::from_utf8(body) {
        let _ = discord::public_key(text);
    }
});
