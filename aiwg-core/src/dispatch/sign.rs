//! Standard Webhooks `v1` signatures: `base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}"))`.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::RngCore as _;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::DispatchError;

const PREFIX: &str = "whsec_";

/// A signing secret: `whsec_` followed by the base64 of 24 to 64 random bytes.
///
/// `Debug` prints `<redacted>`; [`expose`](Self::expose) gives the text to show the user once.
#[derive(Clone)]
pub struct SigningSecret {
    text: String,
    key: Vec<u8>,
    /// HMAC keyed once: each signature starts from a copy of it.
    keyed: Hmac<Sha256>,
}

fn keyed(key: &[u8]) -> Hmac<Sha256> {
    // HMAC accepts keys of any length.
    <Hmac<Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"))
}

impl SigningSecret {
    /// A fresh secret of 32 random bytes.
    #[must_use]
    pub fn generate() -> Self {
        let mut key = vec![0u8; 32];
        rand::rng().fill_bytes(&mut key);
        Self {
            text: format!("{PREFIX}{}", STANDARD.encode(&key)),
            keyed: keyed(&key),
            key,
        }
    }

    /// Parses `whsec_<base64>` (the prefix is required; the key must be 24 to 64 bytes).
    pub fn parse(text: &str) -> Result<Self, DispatchError> {
        let b64 = text.strip_prefix(PREFIX).ok_or_else(|| {
            DispatchError::Invalid("`secret` must look like `whsec_<base64>`".into())
        })?;
        let key = STANDARD.decode(b64).map_err(|_| {
            DispatchError::Invalid("`secret` is not valid base64 after `whsec_`".into())
        })?;
        if !(24..=64).contains(&key.len()) {
            return Err(DispatchError::Invalid(format!(
                "`secret` must decode to 24 to 64 bytes, not {}",
                key.len()
            )));
        }
        Ok(Self {
            text: text.to_owned(),
            keyed: keyed(&key),
            key,
        })
    }

    /// The `whsec_…` text. Show it to the subscriber only when it is created or rotated.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.text
    }

    /// The decoded key bytes.
    #[must_use]
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// `v1,<base64>` for one message.
    #[must_use]
    pub fn sign(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut out = String::with_capacity(SIGNATURE_LEN);
        self.sign_into(msg_id, timestamp, body, &mut out);
        out
    }

    /// Appends `v1,<base64>` to `out`.
    fn sign_into(&self, msg_id: &str, timestamp: i64, body: &[u8], out: &mut String) {
        out.push_str("v1,");
        STANDARD.encode_string(self.mac(msg_id, timestamp, body), out);
    }

    fn mac(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> [u8; 32] {
        let mut mac = self.keyed.clone();
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        let mut digits = [0u8; 20];
        mac.update(decimal(timestamp, &mut digits));
        mac.update(b".");
        mac.update(body);
        mac.finalize().into_bytes().into()
    }

    /// True when one of the space-separated `v1,` signatures of `header` is ours (constant-time).
    #[must_use]
    pub fn verify(&self, msg_id: &str, timestamp: i64, body: &[u8], header: &str) -> bool {
        let expected = self.mac(msg_id, timestamp, body);
        header
            .split(' ')
            .filter_map(|s| s.strip_prefix("v1,"))
            .filter_map(|b64| STANDARD.decode(b64).ok())
            .any(|sig| bool::from(sig.as_slice().ct_eq(&expected)))
    }
}

impl PartialEq for SigningSecret {
    fn eq(&self, other: &Self) -> bool {
        bool::from(self.key.as_slice().ct_eq(&other.key))
    }
}

impl Eq for SigningSecret {}

impl fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningSecret(<redacted>)")
    }
}

/// The `webhook-signature` header value: one `v1,<sig>` per key, space separated.
#[must_use]
pub fn signature_header<'a>(
    keys: impl IntoIterator<Item = &'a SigningSecret>,
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
) -> String {
    let mut out = String::with_capacity(SIGNATURE_LEN);
    for key in keys {
        if !out.is_empty() {
            out.push(' ');
        }
        key.sign_into(msg_id, timestamp, body, &mut out);
    }
    out
}

/// `v1,` and the base64 of 32 bytes.
const SIGNATURE_LEN: usize = 3 + 44;

/// `n` in decimal, written at the end of `buf` (20 bytes hold every `i64`).
fn decimal(n: i64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    let mut rest = n.unsigned_abs();
    loop {
        at -= 1;
        // `rest % 10` is a single digit.
        buf[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    if n < 0 {
        at -= 1;
        buf[at] = b'-';
    }
    &buf[at..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn official_vectors() {
        let s = SigningSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            s.sign(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1_614_265_330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        let s = SigningSecret::parse("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
        let body = br#"{"email":"test@example.com","username":"test_user"}"#;
        assert_eq!(
            s.sign("msg_27UH4WbU6Z5A5EzD8u03UvzRbpk", 1_649_367_553, body),
            "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw="
        );
        assert!(s.verify(
            "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
            1_649_367_553,
            body,
            "v1,bogus v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw="
        ));
        assert!(!s.verify(
            "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
            1_649_367_554,
            body,
            "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw="
        ));
    }

    #[test]
    fn generated_secrets_are_32_bytes_and_distinct() {
        let a = SigningSecret::generate();
        let b = SigningSecret::generate();
        assert!(a.expose().starts_with("whsec_"));
        assert_eq!(a.key().len(), 32);
        assert_ne!(a, b);
        assert_eq!(SigningSecret::parse(a.expose()).unwrap(), a);
        assert_eq!(format!("{a:?}"), "SigningSecret(<redacted>)");
    }

    #[test]
    fn timestamps_are_written_in_decimal() {
        for n in [0, 7, 10, 1_614_265_330, -1, -45, i64::MAX, i64::MIN] {
            let mut buf = [0u8; 20];
            assert_eq!(decimal(n, &mut buf), n.to_string().as_bytes());
        }
    }

    #[test]
    fn bad_secrets_are_refused() {
        for bad in [
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "whsec_!!!",
            "whsec_c2hvcnQ=",
        ] {
            assert!(matches!(
                SigningSecret::parse(bad),
                Err(DispatchError::Invalid(_))
            ));
        }
    }

    #[test]
    fn header_has_one_signature_per_key() {
        let a = SigningSecret::generate();
        let b = SigningSecret::generate();
        let h = signature_header([&a, &b], "msg_1", 5, b"{}");
        let parts: Vec<_> = h.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert!(a.verify("msg_1", 5, b"{}", parts[0]));
        assert!(b.verify("msg_1", 5, b"{}", parts[1]));
        assert!(!a.verify("msg_1", 5, b"{}", parts[1]));
    }
}
