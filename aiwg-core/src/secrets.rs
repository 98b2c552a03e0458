//! Secrets at rest: what the stores encrypt before writing it to a database.
//!
//! A PostgreSQL store that keeps something which lets its holder act as us — an outbound
//! subscription's signing secrets, a job's [`ReplyCredentials`](crate::ReplyCredentials) (a
//! Slack `response_url`, a Discord interaction token) — seals it with a [`SecretKeyring`]
//! first: XChaCha20-Poly1305 (the RustCrypto `chacha20poly1305` crate) under a 256-bit key,
//! a fresh random 192-bit nonce per value, and the row it belongs to as associated data, so a
//! sealed value copied into another row does not open. A sealed value is text:
//!
//! ```text
//! aiwg:v1:<key id>:<base64url(nonce ‖ ciphertext ‖ tag)>
//! ```
//!
//! The keyring comes from the environment variable [`SECRET_KEY_VAR`] (`AIWG_SECRET_KEY`): one
//! or more `<key id>:<base64 of 32 bytes>` separated by commas, the first one sealing new
//! values and every one opening the values sealed under its id. Rotation is: put the new key
//! first, keep the old one after it until every value has been sealed again
//! (`PgDispatchStore::reseal_secrets` does it for subscriptions; job credentials go with their
//! jobs), then drop it. [`SecretKeyring::generate`] makes a new entry (the example server prints
//! one with `server gen-secret-key`).
//!
//! Without a keyring the PostgreSQL stores refuse to write a secret ([`SecretError::NoKey`]
//! names the variable to set); values written before encryption existed (plain text) still
//! read, and are sealed at their next write.
//!
//! ```
//! use aiwg_core::secrets::SecretKeyring;
//!
//! let keyring = SecretKeyring::parse(&SecretKeyring::generate("k1")).unwrap();
//! let sealed = keyring.seal(b"whsec_abc", b"subscription:42");
//! assert!(sealed.starts_with("aiwg:v1:k1:"));
//! assert_eq!(keyring.open(&sealed, b"subscription:42").unwrap(), b"whsec_abc");
//! // Bound to its row: the same text does not open elsewhere.
//! assert!(keyring.open(&sealed, b"subscription:43").is_err());
//! ```

use std::fmt;

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};

/// The environment variable the keyring is read from.
pub const SECRET_KEY_VAR: &str = "AIWG_SECRET_KEY";

/// What every sealed value starts with.
pub const SEALED_PREFIX: &str = "aiwg:v1:";

const NONCE_LEN: usize = 24;

/// Why a keyring could not be made or a value not sealed or opened. Never carries key material
/// or the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    /// A secret was to be stored and there is no key.
    #[error(
        "storing secrets in PostgreSQL needs an encryption key: set {SECRET_KEY_VAR} \
         (`<key id>:<base64 of 32 random bytes>`; `server gen-secret-key` prints one)"
    )]
    NoKey,
    /// The keyring text is malformed; the reason says where (never the key).
    #[error("{SECRET_KEY_VAR}: {0}")]
    InvalidKeyring(String),
    /// The value was sealed under a key id the keyring does not hold.
    #[error("a secret was sealed with key id `{0}`, which {SECRET_KEY_VAR} does not hold")]
    UnknownKey(String),
    /// The value is not a well-formed sealed value, or it does not open with its key (tampered,
    /// or moved to another row).
    #[error("a sealed secret does not open (damaged, or not sealed for this record)")]
    Corrupt,
}

/// The keys secrets are sealed with: the first seals, all open.
#[derive(Clone)]
pub struct SecretKeyring {
    keys: Vec<(String, XChaCha20Poly1305)>,
}

impl fmt::Debug for SecretKeyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretKeyring")
            .field("key_ids", &self.key_ids().collect::<Vec<_>>())
            .finish()
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 32
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

impl SecretKeyring {
    /// A keyring from text: `<key id>:<base64 of 32 bytes>`, several separated by commas, the
    /// first sealing. Key ids are 1 to 32 letters, digits, `-`, `_` or `.`; keys are standard
    /// or URL-safe base64, padded or not.
    ///
    /// # Errors
    /// [`SecretError::InvalidKeyring`] saying which entry is wrong and why.
    pub fn parse(text: &str) -> Result<Self, SecretError> {
        let mut keys: Vec<(String, XChaCha20Poly1305)> = Vec::new();
        for (n, entry) in text.split(',').map(str::trim).enumerate() {
            let n = n + 1;
            if entry.is_empty() {
                continue;
            }
            let Some((id, b64)) = entry.split_once(':') else {
                return Err(SecretError::InvalidKeyring(format!(
                    "entry {n} is not `<key id>:<base64 key>`"
                )));
            };
            let id = id.trim();
            if !valid_id(id) {
                return Err(SecretError::InvalidKeyring(format!(
                    "entry {n}: the key id must be 1 to 32 letters, digits, `-`, `_` or `.`"
                )));
            }
            if keys.iter().any(|(k, _)| k == id) {
                return Err(SecretError::InvalidKeyring(format!(
                    "key id `{id}` appears twice"
                )));
            }
            let b64 = b64.trim().trim_end_matches('=');
            let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
                .decode(b64)
                .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(b64))
                .map_err(|_| SecretError::InvalidKeyring(format!("key `{id}` is not base64")))?;
            if bytes.len() != 32 {
                return Err(SecretError::InvalidKeyring(format!(
                    "key `{id}` is {} bytes; it must be 32",
                    bytes.len()
                )));
            }
            keys.push((
                id.to_owned(),
                XChaCha20Poly1305::new(Key::from_slice(&bytes)),
            ));
        }
        if keys.is_empty() {
            return Err(SecretError::InvalidKeyring("no key given".into()));
        }
        Ok(Self { keys })
    }

    /// The keyring in [`SECRET_KEY_VAR`], `None` when the variable is unset or empty.
    ///
    /// # Errors
    /// [`SecretError::InvalidKeyring`] when it is set and malformed.
    pub fn from_env() -> Result<Option<Self>, SecretError> {
        match std::env::var(SECRET_KEY_VAR) {
            Ok(v) if !v.trim().is_empty() => Self::parse(&v).map(Some),
            Ok(_) | Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => {
                Err(SecretError::InvalidKeyring("the value is not UTF-8".into()))
            }
        }
    }

    /// A new keyring entry `<id>:<base64 of 32 random bytes>` from the operating system's
    /// random source, for [`SECRET_KEY_VAR`].
    #[must_use]
    pub fn generate(id: &str) -> String {
        let key: [u8; 32] = rand::random();
        format!(
            "{id}:{}",
            base64::engine::general_purpose::STANDARD.encode(key)
        )
    }

    /// The key ids, the sealing one first.
    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|(id, _)| id.as_str())
    }

    /// The id of the key that seals.
    #[must_use]
    pub fn current_id(&self) -> &str {
        &self.keys[0].0
    }

    /// Seals `plaintext` for the record `context` (its associated data: a sealed value only
    /// opens with the same context).
    #[must_use]
    pub fn seal(&self, plaintext: &[u8], context: &[u8]) -> String {
        let (id, cipher) = &self.keys[0];
        let nonce: [u8; NONCE_LEN] = rand::random();
        // Encryption with a valid key and nonce cannot fail for inputs under 256 GiB.
        let sealed = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: context,
                },
            )
            .unwrap_or_default();
        let mut blob = Vec::with_capacity(NONCE_LEN + sealed.len());
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&sealed);
        format!(
            "{SEALED_PREFIX}{id}:{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(blob)
        )
    }

    /// Opens a value made by [`seal`](Self::seal) with the same `context`.
    ///
    /// # Errors
    /// [`SecretError::UnknownKey`] for a key id the keyring does not hold,
    /// [`SecretError::Corrupt`] for anything else that does not open.
    pub fn open(&self, sealed: &str, context: &[u8]) -> Result<Vec<u8>, SecretError> {
        let rest = sealed
            .strip_prefix(SEALED_PREFIX)
            .ok_or(SecretError::Corrupt)?;
        let (id, b64) = rest.split_once(':').ok_or(SecretError::Corrupt)?;
        let cipher = self
            .keys
            .iter()
            .find(|(k, _)| k == id)
            .map(|(_, c)| c)
            .ok_or_else(|| SecretError::UnknownKey(id.to_owned()))?;
        let blob = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(b64)
            .map_err(|_| SecretError::Corrupt)?;
        if blob.len() < NONCE_LEN + 16 {
            return Err(SecretError::Corrupt);
        }
        let (nonce, ciphertext) = blob.split_at(NONCE_LEN);
        cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: context,
                },
            )
            .map_err(|_| SecretError::Corrupt)
    }

    /// Whether `value` was sealed under a key other than the sealing one (rotation: seal it
    /// again).
    #[must_use]
    pub fn is_stale(&self, value: &str) -> bool {
        match sealed_key_id(value) {
            Some(id) => id != self.current_id(),
            None => true,
        }
    }
}

/// The key id of a sealed value, `None` when `value` is not sealed (plain text from before
/// encryption).
#[must_use]
pub fn sealed_key_id(value: &str) -> Option<&str> {
    value
        .strip_prefix(SEALED_PREFIX)
        .and_then(|rest| rest.split_once(':'))
        .map(|(id, _)| id)
}

/// Whether `value` is sealed.
#[must_use]
pub fn is_sealed(value: &str) -> bool {
    value.starts_with(SEALED_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "k1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    #[test]
    fn seals_and_opens_with_rotation_by_key_id() {
        let old = SecretKeyring::parse(K1).unwrap();
        let sealed_old = old.seal(b"secret", b"ctx");
        assert!(!sealed_old.contains("secret"));
        // Two seals of one value differ (fresh nonces).
        assert_ne!(sealed_old, old.seal(b"secret", b"ctx"));
        let fresh = SecretKeyring::generate("k2");
        let rotated = SecretKeyring::parse(&format!("{fresh}, {K1}")).unwrap();
        assert_eq!(rotated.current_id(), "k2");
        assert_eq!(rotated.open(&sealed_old, b"ctx").unwrap(), b"secret");
        assert!(rotated.is_stale(&sealed_old));
        let sealed_new = rotated.seal(b"secret", b"ctx");
        assert!(sealed_new.starts_with("aiwg:v1:k2:"));
        assert!(!rotated.is_stale(&sealed_new));
        // The old keyring alone cannot open what the new key sealed.
        assert_eq!(
            old.open(&sealed_new, b"ctx").unwrap_err(),
            SecretError::UnknownKey("k2".into())
        );
    }

    #[test]
    fn tampering_and_other_contexts_do_not_open() {
        let k = SecretKeyring::parse(K1).unwrap();
        let sealed = k.seal(b"secret", b"row-1");
        assert_eq!(k.open(&sealed, b"row-2").unwrap_err(), SecretError::Corrupt);
        let mut bytes = sealed.clone().into_bytes();
        let last = bytes.len() - 1;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(bytes).unwrap();
        assert_eq!(
            k.open(&tampered, b"row-1").unwrap_err(),
            SecretError::Corrupt
        );
        for junk in [
            "",
            "whsec_abc",
            "aiwg:v1:k1",
            "aiwg:v1:k1:!!!",
            "aiwg:v1:k1:AAAA",
        ] {
            assert!(k.open(junk, b"row-1").is_err(), "{junk}");
        }
    }

    #[test]
    fn malformed_keyrings_say_why_without_the_key() {
        let cases = [
            ("", "no key given"),
            ("nocolon", "entry 1 is not `<key id>:<base64 key>`"),
            ("k1:!!!", "key `k1` is not base64"),
            ("k1:AAAA", "key `k1` is 3 bytes; it must be 32"),
            (&format!("{K1},{K1}"), "key id `k1` appears twice"),
            ("bad id:AAAA", "entry 1: the key id must be"),
        ];
        for (text, want) in cases {
            let e = SecretKeyring::parse(text).unwrap_err().to_string();
            assert!(e.starts_with("AIWG_SECRET_KEY: "), "{e}");
            assert!(e.contains(want), "{text}: {e}");
        }
        let e = SecretKeyring::parse("k1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8xx")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("AAECAw"), "{e}");
        assert!(!format!("{:?}", SecretKeyring::parse(K1).unwrap()).contains("AAEC"));
    }
}
