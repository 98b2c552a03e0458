//! GitHub App authentication: an RS256 JWT for the app, exchanged for installation tokens.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;

use chrono::{DateTime, Duration, Utc};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

/// A GitHub App: its id and private key. Installation tokens are cached per installation until
/// a minute before they expire.
pub struct GitHubApp {
    app_id: String,
    key: EncodingKey,
    tokens: Mutex<HashMap<u64, (String, DateTime<Utc>)>>,
}

impl fmt::Debug for GitHubApp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GitHubApp")
            .field("app_id", &self.app_id)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    iat: i64,
    exp: i64,
    iss: &'a str,
}

impl GitHubApp {
    /// The app `app_id` with its PEM private key (PKCS#1 or PKCS#8, as GitHub hands it out).
    ///
    /// # Errors
    /// A reason (never the key) when the key is not an RSA private key in PEM.
    pub fn new(app_id: impl Into<String>, private_key_pem: &str) -> Result<Self, String> {
        let app_id = app_id.into();
        if app_id.trim().is_empty() {
            return Err("app_id is empty".into());
        }
        let key = EncodingKey::from_rsa_pem(private_key_pem.as_bytes())
            .map_err(|_| "private_key is not an RSA private key in PEM".to_owned())?;
        Ok(Self {
            app_id,
            key,
            tokens: Mutex::default(),
        })
    }

    /// The app's JWT at `now`: issued a minute in the past (clock drift), valid nine minutes
    /// (GitHub accepts at most ten), issuer the app id.
    ///
    /// # Panics
    /// Never: signing with a parsed RSA key does not fail.
    #[must_use]
    pub fn jwt(&self, now: DateTime<Utc>) -> String {
        let claims = Claims {
            iat: (now - Duration::seconds(60)).timestamp(),
            exp: (now + Duration::seconds(540)).timestamp(),
            iss: &self.app_id,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &self.key).unwrap_or_default()
    }

    /// A cached installation token still valid for a minute, if any.
    pub(crate) fn cached(&self, installation: u64) -> Option<String> {
        let tokens = self
            .tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        tokens
            .get(&installation)
            .filter(|(_, exp)| *exp - Duration::seconds(60) > Utc::now())
            .map(|(t, _)| t.clone())
    }

    /// Drops a cached installation token the forge refused (revoked before it expired): the
    /// next request buys another.
    pub(crate) fn forget(&self, token: &str) {
        self.tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|_, (t, _)| t != token);
    }

    /// Keeps an installation token until it expires.
    pub(crate) fn remember(&self, installation: u64, token: String, expires_at: DateTime<Utc>) {
        let mut tokens = self
            .tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        tokens.retain(|_, (_, exp)| *exp > Utc::now());
        tokens.insert(installation, (token, expires_at));
    }
}
