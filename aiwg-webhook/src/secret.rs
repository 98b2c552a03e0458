//! [`Secret`]: a string that never shows itself in `Debug` output, logs or errors.

use std::fmt;

use serde::{Deserialize, Deserializer};
use subtle::ConstantTimeEq;

/// A configured secret (signing secret, token, …).
///
/// `Debug` prints `Secret(<redacted>)`; there is no `Display` and no `Serialize`, so a secret
/// cannot end up in a log line, an error message or a serialized config by accident.
/// An empty string counts as "not configured" (see [`Secret::is_configured`]), so that
/// `secret: "${UNSET_VAR}"` fails closed instead of accepting everything.
#[derive(Clone, Default)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`.
    #[must_use]
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself. Only the verifiers should need this.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the secret is non-empty (after trimming whitespace).
    #[must_use]
    pub fn is_configured(&self) -> bool {
        !self.0.trim().is_empty()
    }

    /// Constant-time equality with `candidate` (both sides are hashed first, so not even the
    /// length of the secret leaks through timing).
    #[must_use]
    pub fn matches(&self, candidate: &[u8]) -> bool {
        use sha2::{Digest, Sha256};
        let a = Sha256::digest(self.0.as_bytes());
        let b = Sha256::digest(candidate);
        self.is_configured() && bool::from(a.ct_eq(&b))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_configured() {
            f.write_str("Secret(<redacted>)")
        } else {
            f.write_str("Secret(<empty>)")
        }
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        bool::from(self.0.as_bytes().ct_eq(other.0.as_bytes()))
    }
}

impl Eq for Secret {}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self::new(value)
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted_and_empty_is_not_configured() {
        let s = Secret::new("hunter2-very-secret");
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        assert!(!format!("{s:#?}").contains("hunter2"));
        assert!(!Secret::new("  ").is_configured());
        assert!(!Secret::default().matches(b""));
        assert!(s.matches(b"hunter2-very-secret"));
        assert!(!s.matches(b"hunter2-very-secreT"));
        assert!(!s.matches(b"hunter2"));
    }
}
