//! [Standard Webhooks](https://www.standardwebhooks.com/) `v1` signatures: used by the generic
//! endpoint and by GitLab's webhook signing.
//!
//! Signed content `{webhook-id}.{webhook-timestamp}.{body}`, HMAC-SHA256 with the key decoded
//! from `whsec_<base64>`; `webhook-signature` holds one or more space-separated `v1,<base64>`
//! entries (several during a key rotation), any of which may match; the timestamp must be
//! within 300 s of now, both ways.

use std::fmt;

use base64::Engine as _;
use http::HeaderMap;

use super::{check_window, hmac_sha256, required};
use crate::error::VerifyError;

/// A decoded Standard Webhooks key. `Debug` is redacted.
#[derive(Clone)]
pub struct SigningKey(Vec<u8>);

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningKey(<redacted>)")
    }
}

impl SigningKey {
    /// Decodes `whsec_<base64>` (the prefix is optional).
    pub fn from_secret(secret: &str) -> Result<Self, &'static str> {
        let b64 = secret.trim();
        let b64 = b64.strip_prefix("whsec_").unwrap_or(b64);
        let key = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| "not a whsec_<base64> secret")?;
        if key.is_empty() {
            return Err("empty key");
        }
        Ok(Self(key))
    }

    /// The `v1,<base64>` signature of a message (what a sender puts in `webhook-signature`).
    #[must_use]
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        use hmac::Mac;
        let ts = timestamp.to_string();
        let mac = hmac_sha256(&self.0, &[id.as_bytes(), b".", ts.as_bytes(), b".", body]);
        format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        )
    }
}

/// Verifies the `webhook-id`, `webhook-timestamp` and `webhook-signature` headers against
/// `body` at time `now` (Unix seconds).
pub fn verify(
    key: &SigningKey,
    headers: &HeaderMap,
    body: &[u8],
    now: i64,
) -> Result<(), VerifyError> {
    use hmac::Mac;
    let id = required(headers, "webhook-id")?;
    let ts_text = required(headers, "webhook-timestamp")?;
    let signatures = required(headers, "webhook-signature")?;
    let ts: i64 = ts_text
        .parse()
        .map_err(|_| VerifyError::MalformedHeader("webhook-timestamp"))?;
    check_window(ts, now)?;
    let mac = hmac_sha256(
        &key.0,
        &[id.as_bytes(), b".", ts_text.as_bytes(), b".", body],
    );
    let mut any_v1 = false;
    for entry in signatures.split_ascii_whitespace() {
        let Some(b64) = entry.strip_prefix("v1,") else {
            continue;
        };
        let Ok(sig) = base64::engine::general_purpose::STANDARD.decode(b64) else {
            continue;
        };
        any_v1 = true;
        if mac.clone().verify_slice(&sig).is_ok() {
            return Ok(());
        }
    }
    Err(if any_v1 {
        VerifyError::Mismatch
    } else {
        VerifyError::MalformedSignature
    })
}

/// The signing key of a `whsec_` secret, or `None` when the secret is not configured.
pub(crate) fn signing_key(
    secret: &crate::secret::Secret,
    key: &str,
) -> Result<Option<SigningKey>, crate::BuildError> {
    if !secret.is_configured() {
        return Ok(None);
    }
    SigningKey::from_secret(secret.expose())
        .map(Some)
        .map_err(|reason| crate::BuildError::InvalidKey {
            key: key.to_owned(),
            reason,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(id: &str, ts: &str, sig: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("webhook-id", id.parse().expect("header"));
        h.insert("webhook-timestamp", ts.parse().expect("header"));
        h.insert("webhook-signature", sig.parse().expect("header"));
        h
    }

    #[test]
    fn peers_vectors() {
        let key = SigningKey::from_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("key");
        let body = br#"{"test": 2432232314}"#;
        let sig = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
        assert_eq!(
            key.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1_614_265_330, body),
            sig
        );
        let h = headers("msg_p5jXN8AQM9LWM0D4loKWxJek", "1614265330", sig);
        assert_eq!(verify(&key, &h, body, 1_614_265_330), Ok(()));

        let key = SigningKey::from_secret("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").expect("key");
        let body = br#"{"email":"test@example.com","username":"test_user"}"#;
        let sig = "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=";
        let h = headers("msg_27UH4WbU6Z5A5EzD8u03UvzRbpk", "1649367553", sig);
        assert_eq!(verify(&key, &h, body, 1_649_367_553 + 299), Ok(()));
        // several signatures, one good
        let h = headers(
            "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
            "1649367553",
            &format!("v1a,xyz v1,AAAA v1,bm90IGl0 {sig}"),
        );
        assert_eq!(verify(&key, &h, body, 1_649_367_553), Ok(()));
        // negatives
        assert_eq!(
            verify(&key, &h, b"{}", 1_649_367_553),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            verify(&key, &h, body, 1_649_367_553 + 301),
            Err(VerifyError::StaleTimestamp)
        );
        assert_eq!(
            verify(&key, &h, body, 1_649_367_553 - 301),
            Err(VerifyError::FutureTimestamp)
        );
        // Truncated: still valid base64 (15 bytes) → mismatch; not base64 → malformed.
        let truncated = headers("msg_27UH4WbU6Z5A5EzD8u03UvzRbpk", "1649367553", &sig[..23]);
        assert_eq!(
            verify(&key, &truncated, body, 1_649_367_553),
            Err(VerifyError::Mismatch)
        );
        let truncated = headers("msg_27UH4WbU6Z5A5EzD8u03UvzRbpk", "1649367553", &sig[..20]);
        assert_eq!(
            verify(&key, &truncated, body, 1_649_367_553),
            Err(VerifyError::MalformedSignature)
        );
        let mut missing = h.clone();
        missing.remove("webhook-id");
        assert_eq!(
            verify(&key, &missing, body, 1_649_367_553),
            Err(VerifyError::MissingHeader("webhook-id"))
        );
        let wrong = SigningKey::from_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("key");
        assert_eq!(
            verify(&wrong, &h, body, 1_649_367_553),
            Err(VerifyError::Mismatch)
        );
        assert!(!format!("{wrong:?}").contains("MfKQ"));
    }

    #[test]
    fn independent_signer_agrees() {
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let wh = standardwebhooks::Webhook::new(secret).expect("standardwebhooks key");
        let body = br#"{"hello":"world"}"#;
        let sig = wh.sign("msg_1", 1_700_000_000, body).expect("signs");
        let key = SigningKey::from_secret(secret).expect("key");
        let h = headers("msg_1", "1700000000", &sig);
        assert_eq!(verify(&key, &h, body, 1_700_000_000), Ok(()));
    }
}
