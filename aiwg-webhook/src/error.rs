//! The crate's errors. None of them ever carries a secret or an expected signature.

use thiserror::Error;

/// Why a delivery failed verification (answered with 401).
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// Nothing to verify against: the platform has no secret, token or key configured.
    #[error("no secret is configured for this platform; refusing every delivery")]
    NotConfigured,
    /// A header the platform always sends is absent.
    #[error("missing header `{0}`")]
    MissingHeader(&'static str),
    /// A header is present but empty or not valid text.
    #[error("malformed header `{0}`")]
    MalformedHeader(&'static str),
    /// The signature is not in the platform's format (wrong prefix, not hex/base64, wrong length).
    #[error("malformed signature")]
    MalformedSignature,
    /// The signature does not match the body.
    #[error("signature does not match")]
    Mismatch,
    /// The bearer token or shared token does not match.
    #[error("token does not match")]
    TokenMismatch,
    /// The signed timestamp is older than the tolerance window.
    #[error("timestamp too old")]
    StaleTimestamp,
    /// The signed timestamp is further in the future than the tolerance window.
    #[error("timestamp too far in the future")]
    FutureTimestamp,
}

impl VerifyError {
    /// A short, stable label for metrics (`aiwg_webhook_errors_total{reason}`).
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotConfigured => "not_configured",
            Self::MissingHeader(_) | Self::MalformedHeader(_) => "missing_header",
            Self::MalformedSignature | Self::Mismatch | Self::TokenMismatch => "bad_signature",
            Self::StaleTimestamp | Self::FutureTimestamp => "timestamp",
        }
    }
}

/// Why a verified delivery could not be understood (answered with 400).
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ParseError {
    /// A header the platform always sends is absent or empty.
    #[error("missing header `{0}`")]
    MissingHeader(&'static str),
    /// The body is not the JSON the platform sends.
    #[error("invalid JSON payload: {0}")]
    Json(String),
    /// The body is not valid `application/x-www-form-urlencoded`.
    #[error("invalid form payload: {0}")]
    Form(&'static str),
    /// A field we need is absent.
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    /// The payload is of a kind this platform does not send.
    #[error("unsupported payload: {0}")]
    Unsupported(String),
}

impl ParseError {
    pub(crate) fn json(e: &serde_json::Error) -> Self {
        // serde_json's messages name a position and an expectation, never the input's content.
        Self::Json(e.to_string())
    }
}

/// Why a [`Hooks`](crate::Hooks) could not be built from its configuration.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum BuildError {
    /// A configured key could not be decoded (the message names the key, never its value).
    #[error("triggers.{key}: {reason}")]
    InvalidKey {
        /// The configuration key, e.g. `discord.public_key`.
        key: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A configuration value is invalid.
    #[error("triggers.{key}: {reason}")]
    Invalid {
        /// The configuration key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// A failure of a [`DeliveryStore`](crate::DeliveryStore) backend.
#[derive(Clone, Debug, Error)]
#[non_exhaustive]
pub enum DeliveryStoreError {
    /// The backend failed (connection lost, …); the cause is its source.
    #[error("delivery store unavailable: {0}")]
    Unavailable(#[source] aiwg_core::BackendError),
}
