//! JWT / OIDC bearer tokens beside API keys (`auth.jwt`).
//!
//! A [`JwtVerifier`] accepts tokens an identity provider signed with RS256, ES256 or EdDSA,
//! for one issuer and one audience. Its keys come from the provider's JWKS document
//! ([`JwtVerifierBuilder::jwks_url`], fetched on first use, kept for an hour, and fetched again
//! when a token names a key id the cache does not hold, at most once per
//! [`JwtVerifierBuilder::refresh_cooldown`] so forged key ids cannot make the server hammer the
//! provider) or are configured as PEM public keys ([`JwtVerifierBuilder::public_key_pem`]).
//!
//! Every refusal names its reason, which the API sends back as
//! `WWW-Authenticate: Bearer error="invalid_token", error_description="…"` with a 401:
//! unsigned tokens (`alg: none`), shared-secret algorithms (`HS256`, the HS/RS confusion
//! attack), unknown key ids, bad signatures, expired or not-yet-valid tokens, and tokens for
//! another issuer or audience. A token must carry `sub`, `iss`, `aud` and `exp`.
//!
//! The token's scopes come from one claim ([`JwtVerifierBuilder::scopes_claim`], default
//! `scope`), a space-separated string (OAuth 2.0's `scope`) or an array of strings; the names
//! `trigger`, `read`, `cancel` and `admin` become aiwg's [`Scope`]s, and any other name is
//! ignored. The caller is known by its `sub`: jobs it triggers name it as their actor, and its
//! rate limit and idempotency keys are its own (`jwt:<sub>`), apart from any API key's.
//!
//! ```
//! use std::time::Duration;
//! use aiwg_core::http::JwtVerifier;
//!
//! let verifier = JwtVerifier::builder("https://id.example.com/", "aiwg")
//!     .jwks_url("https://id.example.com/.well-known/jwks.json")
//!     .unwrap()
//!     .leeway(Duration::from_secs(30))
//!     .build()
//!     .unwrap();
//! # let _ = verifier;
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

use super::auth::Scope;
use super::verified_tokens::{self, Times, VerifiedBy, VerifiedTokens};

/// The algorithms a token may be signed with.
const ACCEPTED: &str = "RS256, ES256 and EdDSA";

/// After a failed JWKS fetch, none is tried for this long, whatever the tokens presented.
const FAILURE_BACKOFF: Duration = Duration::from_secs(5);

/// The largest JWKS document read.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// Why a token was refused (or could not be checked). [`JwtError::description`] is what the
/// API puts in `error_description`; no variant carries the token.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    /// Not three base64url segments with a JSON header.
    #[error("the token is not a well-formed JWT")]
    Malformed,
    /// `alg: none`.
    #[error("unsigned tokens (alg `none`) are not accepted")]
    Unsigned,
    /// An HMAC algorithm: a shared secret aiwg does not hold (the HS/RS confusion attack).
    #[error(
        "the token is signed with {0}, a shared-secret algorithm; only {ACCEPTED} are accepted"
    )]
    SharedSecret(String),
    /// Another algorithm.
    #[error("the token's algorithm `{0}` is not accepted; only {ACCEPTED} are")]
    Algorithm(String),
    /// No configured or published key fits the token's key id and algorithm.
    #[error("no signing key matches the token (kid {kid}, alg {alg})")]
    UnknownKey {
        /// The token's `kid` (`none` without one).
        kid: String,
        /// The token's `alg`.
        alg: String,
    },
    /// The signature does not verify.
    #[error("the token's signature is invalid")]
    Signature,
    /// `exp` has passed (beyond the leeway).
    #[error("the token has expired")]
    Expired,
    /// `nbf` is still ahead (beyond the leeway).
    #[error("the token is not valid yet (nbf is in the future)")]
    NotYetValid,
    /// `aud` does not name this API.
    #[error("the token's audience is not `{0}`")]
    Audience(String),
    /// `iss` is another issuer.
    #[error("the token's issuer is not `{0}`")]
    Issuer(String),
    /// A required claim (`sub`, `iss`, `aud`, `exp`) is missing or not of its type.
    #[error("the token lacks a valid `{0}` claim")]
    Claim(String),
    /// The JWKS document could not be fetched or read: the token could not be checked.
    #[error("the signing keys could not be fetched from the JWKS URL")]
    KeysUnavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl JwtError {
    /// Whether the token itself was refused (`401 invalid_token`), as opposed to the keys
    /// being unavailable (`503`).
    #[must_use]
    pub fn is_invalid_token(&self) -> bool {
        !matches!(self, JwtError::KeysUnavailable(_))
    }

    /// The text of `error_description` (RFC 6750): this error's message.
    #[must_use]
    pub fn description(&self) -> String {
        self.to_string()
    }
}

/// Why a [`JwtVerifier`] could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtConfigError {
    /// `issuer` or `audience` is empty.
    #[error("`{0}` must not be empty")]
    Empty(&'static str),
    /// Neither a JWKS URL nor a public key.
    #[error("give `jwks_url` or `public_keys`")]
    NoKeys,
    /// The JWKS URL is not an http(s) URL.
    #[error("`{0}` is not an http or https URL")]
    Url(String),
    /// A public key is not an RSA, P-256 or Ed25519 public key in PEM.
    #[error("public key {0} is not an RSA, EC P-256 or Ed25519 public key in PEM")]
    Pem(usize),
    /// A leeway past [`MAX_LEEWAY`]: a grace period for expired tokens, not clock skew.
    #[error("`leeway` is {0:?}; at most 5 minutes (it allows for clocks that differ, not for expired tokens)")]
    Leeway(Duration),
}

/// The most clock skew [`JwtVerifierBuilder::leeway`] accepts.
pub const MAX_LEEWAY: Duration = Duration::from_secs(300);

/// A verification key: what it checks and under which key id.
struct VerifyKey {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

impl VerifyKey {
    fn fits(&self, kid: Option<&str>, alg: Algorithm) -> bool {
        self.alg == alg && (kid.is_none() || self.kid.is_none() || self.kid.as_deref() == kid)
    }
}

/// The JWKS cache.
struct Jwks {
    url: reqwest::Url,
    http: reqwest::Client,
    state: tokio::sync::RwLock<JwksState>,
    /// One fetch at a time.
    fetching: tokio::sync::Mutex<()>,
    cooldown: Duration,
    max_age: Duration,
}

#[derive(Default)]
struct JwksState {
    keys: Arc<Vec<VerifyKey>>,
    fetched_at: Option<Instant>,
    /// The last fetch an unknown key id caused.
    forced_at: Option<Instant>,
    /// The last failed fetch: none is tried again within [`FAILURE_BACKOFF`].
    failed_at: Option<Instant>,
    fetches: u64,
}

struct Inner {
    issuer: String,
    audience: String,
    scopes_claim: String,
    leeway: Duration,
    keys: Vec<VerifyKey>,
    jwks: Option<Jwks>,
    /// Tokens verified already (see [`verified_tokens`]).
    verified: VerifiedTokens<Vec<VerifyKey>>,
}

/// Verifies bearer JWTs. Cheap to clone; build it with [`JwtVerifier::builder`].
#[derive(Clone)]
pub struct JwtVerifier {
    inner: Arc<Inner>,
}

impl fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("issuer", &self.inner.issuer)
            .field("audience", &self.inner.audience)
            .field(
                "jwks_url",
                &self.inner.jwks.as_ref().map(|j| j.url.as_str()),
            )
            .field("public_keys", &self.inner.keys.len())
            .finish_non_exhaustive()
    }
}

/// Builds a [`JwtVerifier`].
#[must_use]
pub struct JwtVerifierBuilder {
    issuer: String,
    audience: String,
    scopes_claim: String,
    leeway: Duration,
    jwks_url: Option<reqwest::Url>,
    keys: Vec<VerifyKey>,
    cooldown: Duration,
    max_age: Duration,
}

impl fmt::Debug for JwtVerifierBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtVerifierBuilder")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

impl JwtVerifierBuilder {
    /// The JWKS document's URL (the provider's `jwks_uri`).
    pub fn jwks_url(mut self, url: &str) -> Result<Self, JwtConfigError> {
        let parsed = reqwest::Url::parse(url)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| JwtConfigError::Url(url.to_owned()))?;
        self.jwks_url = Some(parsed);
        Ok(self)
    }

    /// A public key in PEM (`-----BEGIN PUBLIC KEY-----`): RSA (for RS256), EC P-256 (ES256)
    /// or Ed25519 (EdDSA). Tokens are checked against every configured key of their algorithm.
    pub fn public_key_pem(mut self, pem: &str) -> Result<Self, JwtConfigError> {
        let n = self.keys.len();
        let bytes = pem.trim().as_bytes();
        let key = DecodingKey::from_rsa_pem(bytes)
            .map(|k| (Algorithm::RS256, k))
            .or_else(|_| DecodingKey::from_ec_pem(bytes).map(|k| (Algorithm::ES256, k)))
            .or_else(|_| DecodingKey::from_ed_pem(bytes).map(|k| (Algorithm::EdDSA, k)))
            .map_err(|_| JwtConfigError::Pem(n))?;
        self.keys.push(VerifyKey {
            kid: None,
            alg: key.0,
            key: key.1,
        });
        Ok(self)
    }

    /// The claim that holds the token's scopes (default `scope`; `scp` and `roles` are other
    /// common ones).
    pub fn scopes_claim(mut self, claim: impl Into<String>) -> Self {
        self.scopes_claim = claim.into();
        self
    }

    /// Clock skew allowed on `exp` and `nbf` (default 60 s, at most [`MAX_LEEWAY`]: `build`
    /// refuses more).
    pub fn leeway(mut self, leeway: Duration) -> Self {
        self.leeway = leeway;
        self
    }

    /// The least time between two fetches of the JWKS that unknown key ids cause (default
    /// 30 s). Tokens with a key id the cache lacks are refused without a fetch in between.
    pub fn refresh_cooldown(mut self, cooldown: Duration) -> Self {
        self.cooldown = cooldown;
        self
    }

    /// How long a fetched JWKS is used before it is fetched again (default 1 h).
    pub fn max_age(mut self, max_age: Duration) -> Self {
        self.max_age = max_age;
        self
    }

    /// Builds the verifier.
    pub fn build(self) -> Result<JwtVerifier, JwtConfigError> {
        if self.issuer.trim().is_empty() {
            return Err(JwtConfigError::Empty("issuer"));
        }
        if self.audience.trim().is_empty() {
            return Err(JwtConfigError::Empty("audience"));
        }
        if self.scopes_claim.trim().is_empty() {
            return Err(JwtConfigError::Empty("scopes_claim"));
        }
        if self.jwks_url.is_none() && self.keys.is_empty() {
            return Err(JwtConfigError::NoKeys);
        }
        if self.leeway > MAX_LEEWAY {
            return Err(JwtConfigError::Leeway(self.leeway));
        }
        let jwks = self.jwks_url.map(|url| Jwks {
            url,
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(10))
                .redirect(reqwest::redirect::Policy::none())
                .user_agent(concat!("aiwg/", env!("CARGO_PKG_VERSION")))
                .build()
                .unwrap_or_default(),
            state: tokio::sync::RwLock::default(),
            fetching: tokio::sync::Mutex::new(()),
            cooldown: self.cooldown,
            max_age: self.max_age,
        });
        Ok(JwtVerifier {
            inner: Arc::new(Inner {
                issuer: self.issuer,
                audience: self.audience,
                scopes_claim: self.scopes_claim,
                leeway: self.leeway,
                keys: self.keys,
                jwks,
                verified: VerifiedTokens::default(),
            }),
        })
    }
}

/// Who a verified token names.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct JwtIdentity {
    /// The `sub` claim.
    pub subject: String,
    /// aiwg's scopes among the token's (unknown names dropped).
    pub scopes: Vec<Scope>,
}

/// What a token's whole verification proved: who it names, its time claims when they can be
/// checked again (whole numbers), and which keys verified it.
type Proved = (JwtIdentity, Option<Times>, VerifiedBy<Vec<VerifyKey>>);

/// A token's header, read before anything is trusted.
struct Header {
    alg: String,
    kid: Option<String>,
}

fn read_header(token: &str) -> Result<Header, JwtError> {
    let mut parts = token.split('.');
    let (Some(h), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(h.trim_end_matches('='))
        .map_err(|_| JwtError::Malformed)?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|_| JwtError::Malformed)?;
    let alg = v
        .get("alg")
        .and_then(Value::as_str)
        .ok_or(JwtError::Malformed)?
        .to_owned();
    let kid = match v.get("kid") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(JwtError::Malformed),
    };
    Ok(Header { alg, kid })
}

/// Whether `token` has the shape of a JWT (three base64url segments), so a bearer value is
/// worth verifying as one.
pub(crate) fn looks_like_jwt(token: &str) -> bool {
    let segs: Vec<&str> = token.split('.').collect();
    let b64url = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    // The signature may be empty: an unsigned token is still a JWT, refused as one.
    segs.len() == 3 && !segs[0].is_empty() && !segs[1].is_empty() && segs.iter().all(|s| b64url(s))
}

/// A verified token's time claims, when they are whole numbers of seconds (what
/// [`VerifiedTokens`] can check again as the full verification does); otherwise the token is
/// not kept and is verified at every use.
fn times(claims: &serde_json::Map<String, Value>) -> Option<Times> {
    let exp = claims.get("exp")?.as_u64()?;
    let nbf = match claims.get("nbf") {
        None => None,
        Some(v) => Some(v.as_u64()?),
    };
    Some(Times { exp, nbf })
}

fn algorithm(name: &str) -> Result<Algorithm, JwtError> {
    match name {
        "RS256" => Ok(Algorithm::RS256),
        "ES256" => Ok(Algorithm::ES256),
        "EdDSA" => Ok(Algorithm::EdDSA),
        n if n.eq_ignore_ascii_case("none") => Err(JwtError::Unsigned),
        n if n.starts_with("HS") => Err(JwtError::SharedSecret(n.to_owned())),
        n => Err(JwtError::Algorithm(n.chars().take(32).collect())),
    }
}

/// Scope names from the claim's value: a space-separated string or an array of strings.
fn scopes(value: Option<&Value>) -> Vec<Scope> {
    let names: Vec<&str> = match value {
        Some(Value::String(s)) => s.split_whitespace().collect(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    let mut out: Vec<Scope> = Vec::new();
    for n in names {
        if let Ok(s) = n.parse::<Scope>() {
            if !out.contains(&s) {
                out.push(s);
            }
        }
    }
    out
}

impl JwtVerifier {
    /// A builder for tokens of `issuer` (the `iss` claim, exactly) meant for `audience`
    /// (one of the `aud` claim's values). Add [`jwks_url`](JwtVerifierBuilder::jwks_url) or
    /// [`public_key_pem`](JwtVerifierBuilder::public_key_pem).
    pub fn builder(issuer: impl Into<String>, audience: impl Into<String>) -> JwtVerifierBuilder {
        JwtVerifierBuilder {
            issuer: issuer.into(),
            audience: audience.into(),
            scopes_claim: "scope".into(),
            leeway: Duration::from_secs(60),
            jwks_url: None,
            keys: Vec::new(),
            cooldown: Duration::from_secs(30),
            max_age: Duration::from_secs(3600),
        }
    }

    /// How many times the JWKS document has been fetched (successfully or not).
    pub async fn jwks_fetches(&self) -> u64 {
        match &self.inner.jwks {
            Some(j) => j.state.read().await.fetches,
            None => 0,
        }
    }

    /// Verifies `token`: its algorithm, key, signature, `iss`, `aud`, `exp`, `nbf` and `sub`.
    ///
    /// A token verified before is not verified again while its `exp` and `nbf` hold (checked
    /// at every use, with the leeway) and the keys that verified it are still the ones in use:
    /// a key of the builder's own, or the JWKS key set held when it was verified (once the
    /// JWKS is fetched again, every token is verified against the new set). A client sending
    /// one token on every request pays its signature check once. At most 4 096 verified tokens
    /// are kept, found by the SHA-256 of their text; refused tokens never are.
    pub async fn verify(&self, token: &str) -> Result<JwtIdentity, JwtError> {
        let digest = verified_tokens::digest(token);
        let now = jsonwebtoken::get_current_timestamp();
        let leeway = self.inner.leeway.as_secs();
        // A token verified before: no header to read, no signature to check.
        let held = match &self.inner.jwks {
            Some(jwks) => jwks.held().await,
            None => None,
        };
        if let Some(identity) = self
            .inner
            .verified
            .get(&digest, held.as_ref(), now, leeway)?
        {
            return Ok(identity);
        }
        let header = read_header(token)?;
        let alg = algorithm(&header.alg)?;
        let kid = header.kid.as_deref();
        let published = match &self.inner.jwks {
            Some(jwks) => Some(jwks.keys_for(kid, alg).await?),
            None => None,
        };
        let (identity, times, by) = self.verify_signed(token, &header, alg, published)?;
        if let Some(times) = times {
            self.inner
                .verified
                .insert(digest, identity.clone(), times, by, now, leeway);
        }
        Ok(identity)
    }

    /// The whole verification of `token` against the verifier's own keys and `published`:
    /// the identity, the time claims when they can be kept (whole numbers), and which keys
    /// verified it.
    fn verify_signed(
        &self,
        token: &str,
        header: &Header,
        alg: Algorithm,
        published: Option<Arc<Vec<VerifyKey>>>,
    ) -> Result<Proved, JwtError> {
        let kid = header.kid.as_deref();
        let mut validation = Validation::new(alg);
        validation.leeway = self.inner.leeway.as_secs();
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.inner.issuer]);
        validation.set_audience(&[&self.inner.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);

        let candidates = self
            .inner
            .keys
            .iter()
            .map(|k| (true, k))
            .chain(
                published
                    .iter()
                    .flat_map(|set| set.iter())
                    .map(|k| (false, k)),
            )
            .filter(|(_, k)| k.fits(kid, alg));
        let mut tried = false;
        for (own, key) in candidates {
            tried = true;
            match jsonwebtoken::decode::<serde_json::Map<String, Value>>(
                token,
                &key.key,
                &validation,
            ) {
                Ok(data) => {
                    let identity = self.identity(&data.claims)?;
                    let by = match (&published, own) {
                        (Some(set), false) => VerifiedBy::Published(Arc::downgrade(set)),
                        _ => VerifiedBy::Own,
                    };
                    return Ok((identity, times(&data.claims), by));
                }
                Err(e) => match e.kind() {
                    jsonwebtoken::errors::ErrorKind::InvalidSignature
                    | jsonwebtoken::errors::ErrorKind::InvalidEcdsaKey
                    | jsonwebtoken::errors::ErrorKind::InvalidRsaKey(_)
                    | jsonwebtoken::errors::ErrorKind::Crypto(_) => {}
                    other => return Err(self.claim_error(other)),
                },
            }
        }
        if tried {
            Err(JwtError::Signature)
        } else {
            Err(JwtError::UnknownKey {
                kid: kid.map_or_else(|| "none".into(), |k| k.chars().take(64).collect()),
                alg: header.alg.clone(),
            })
        }
    }

    fn claim_error(&self, kind: &jsonwebtoken::errors::ErrorKind) -> JwtError {
        use jsonwebtoken::errors::ErrorKind as K;
        match kind {
            K::ExpiredSignature => JwtError::Expired,
            K::ImmatureSignature => JwtError::NotYetValid,
            K::InvalidAudience => JwtError::Audience(self.inner.audience.clone()),
            K::InvalidIssuer => JwtError::Issuer(self.inner.issuer.clone()),
            K::MissingRequiredClaim(c) => JwtError::Claim(c.clone()),
            K::InvalidAlgorithm => JwtError::Algorithm(String::from("(mismatch)")),
            _ => JwtError::Malformed,
        }
    }

    fn identity(&self, claims: &serde_json::Map<String, Value>) -> Result<JwtIdentity, JwtError> {
        // jsonwebtoken 9 takes an `nbf` that is not a number for no `nbf` at all
        // (GHSA-h395-gr6q-cpjc): a time claim of another type is refused here.
        for name in ["exp", "nbf"] {
            if claims.get(name).is_some_and(|v| !v.is_number()) {
                return Err(JwtError::Claim(name.into()));
            }
        }
        let subject = claims
            .get("sub")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| JwtError::Claim("sub".into()))?;
        Ok(JwtIdentity {
            subject: subject.to_owned(),
            scopes: scopes(claims.get(&self.inner.scopes_claim)),
        })
    }
}

impl Jwks {
    /// The published keys held, while younger than `max_age` (no fetch).
    async fn held(&self) -> Option<Arc<Vec<VerifyKey>>> {
        let st = self.state.read().await;
        st.fetched_at
            .is_some_and(|t| t.elapsed() < self.max_age)
            .then(|| st.keys.clone())
    }

    /// The published keys, fetched when none are held or they are older than `max_age`, and
    /// fetched again when `kid` is unknown (at most once per cooldown).
    async fn keys_for(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<Arc<Vec<VerifyKey>>, JwtError> {
        {
            let st = self.state.read().await;
            let fresh = st.fetched_at.is_some_and(|t| t.elapsed() < self.max_age);
            let known = kid.is_none() || st.keys.iter().any(|k| k.fits(kid, alg));
            if fresh && known {
                return Ok(st.keys.clone());
            }
        }
        let _one = self.fetching.lock().await;
        // Another caller may have fetched while this one waited.
        let mut st = self.state.write().await;
        let fresh = st.fetched_at.is_some_and(|t| t.elapsed() < self.max_age);
        let known = kid.is_none() || st.keys.iter().any(|k| k.fits(kid, alg));
        if fresh && known {
            return Ok(st.keys.clone());
        }
        if st.failed_at.is_some_and(|t| t.elapsed() < FAILURE_BACKOFF) {
            // The provider failed a moment ago: use what is held, fetch nothing.
            return if st.fetched_at.is_some() {
                Ok(st.keys.clone())
            } else {
                Err(JwtError::KeysUnavailable(
                    "the last JWKS fetch failed moments ago".into(),
                ))
            };
        }
        if fresh {
            // Unknown key id: refetch only past the cooldown.
            if st.forced_at.is_some_and(|t| t.elapsed() < self.cooldown) {
                return Ok(st.keys.clone());
            }
            st.forced_at = Some(Instant::now());
        }
        st.fetches += 1;
        drop(st);
        let fetched = self.fetch().await;
        let mut st = self.state.write().await;
        match fetched {
            Ok(keys) => {
                st.keys = Arc::new(keys);
                st.fetched_at = Some(Instant::now());
                st.failed_at = None;
                Ok(st.keys.clone())
            }
            // Keys fetched before stay in use while the provider is unreachable.
            Err(e) if st.fetched_at.is_some() => {
                st.failed_at = Some(Instant::now());
                tracing::warn!(url = %self.url, error = %e, "JWKS fetch failed; keeping the keys held");
                Ok(st.keys.clone())
            }
            Err(e) => {
                st.failed_at = Some(Instant::now());
                tracing::warn!(url = %self.url, error = %e, "JWKS fetch failed");
                Err(JwtError::KeysUnavailable(e))
            }
        }
    }

    async fn fetch(&self) -> Result<Vec<VerifyKey>, Box<dyn std::error::Error + Send + Sync>> {
        let mut res = self
            .http
            .get(self.url.clone())
            .header(http::header::ACCEPT, "application/json")
            .send()
            .await?
            .error_for_status()?;
        let mut body = Vec::new();
        while let Some(chunk) = res.chunk().await? {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err("the JWKS document is larger than 1 MiB".into());
            }
            body.extend_from_slice(&chunk);
        }
        // Entries aiwg cannot read (other key types, unknown algorithms) are skipped one by
        // one rather than failing the whole document.
        #[derive(serde::Deserialize)]
        struct Set {
            keys: Vec<Value>,
        }
        let set: Set = serde_json::from_slice(&body)?;
        Ok(set
            .keys
            .into_iter()
            .filter_map(|v| serde_json::from_value::<Jwk>(v).ok())
            .filter_map(|jwk| jwk_key(&jwk))
            .collect())
    }
}

/// A JWKS entry as a verification key: RSA, EC P-256 and Ed25519 signing keys; anything else
/// (symmetric keys, encryption keys, other curves) is left out.
fn jwk_key(jwk: &Jwk) -> Option<VerifyKey> {
    use jsonwebtoken::jwk::PublicKeyUse;
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return None;
    }
    let alg = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        _ => return None,
    };
    // A key that names its algorithm is used for that one only.
    let named = jwk.common.key_algorithm.map(|a| match a {
        KeyAlgorithm::RS256 => Some(Algorithm::RS256),
        KeyAlgorithm::ES256 => Some(Algorithm::ES256),
        KeyAlgorithm::EdDSA => Some(Algorithm::EdDSA),
        _ => None,
    });
    if named.is_some_and(|n| n != Some(alg)) {
        return None;
    }
    Some(VerifyKey {
        kid: jwk.common.key_id.clone(),
        alg,
        key: DecodingKey::from_jwk(jwk).ok()?,
    })
}

/// The configured keys' algorithms, for tests.
#[cfg(test)]
fn algs(v: &JwtVerifier) -> std::collections::HashSet<Algorithm> {
    v.inner.keys.iter().map(|k| k.alg).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_headers_and_scopes() {
        assert!(looks_like_jwt("eyJh.eyJz.c2ln"));
        assert!(!looks_like_jwt("suite-admin-key-0123456789"));
        assert!(!looks_like_jwt("a.b"));
        assert!(!looks_like_jwt("a..c"));
        assert!(looks_like_jwt("a.b."));
        assert!(!looks_like_jwt("a.b.c.d"));
        assert!(matches!(algorithm("none"), Err(JwtError::Unsigned)));
        assert!(matches!(algorithm("HS256"), Err(JwtError::SharedSecret(_))));
        assert!(matches!(algorithm("PS256"), Err(JwtError::Algorithm(_))));
        assert_eq!(algorithm("EdDSA").unwrap(), Algorithm::EdDSA);
        let h =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"alg":"none","kid":"k"}"#);
        let header = read_header(&format!("{h}.e30.")).unwrap();
        assert_eq!(
            (header.alg.as_str(), header.kid.as_deref()),
            ("none", Some("k"))
        );
        assert!(matches!(read_header("x.y"), Err(JwtError::Malformed)));
        assert_eq!(
            scopes(Some(&Value::String("openid read  admin read".into()))),
            vec![Scope::Read, Scope::Admin]
        );
        assert_eq!(
            scopes(Some(&serde_json::json!([
                "trigger", "approve", "deploy", 3
            ]))),
            vec![Scope::Trigger, Scope::Approve]
        );
        assert!(scopes(None).is_empty());
    }

    #[test]
    fn builder_refuses_what_cannot_work() {
        assert_eq!(
            JwtVerifier::builder("i", "a").build().unwrap_err(),
            JwtConfigError::NoKeys
        );
        assert_eq!(
            JwtVerifier::builder("", "a")
                .jwks_url("http://127.0.0.1/jwks")
                .unwrap()
                .build()
                .unwrap_err(),
            JwtConfigError::Empty("issuer")
        );
        assert_eq!(
            JwtVerifier::builder("i", "a")
                .jwks_url("file:///etc/passwd")
                .unwrap_err(),
            JwtConfigError::Url("file:///etc/passwd".into())
        );
        assert_eq!(
            JwtVerifier::builder("i", "a")
                .public_key_pem("not a key")
                .unwrap_err(),
            JwtConfigError::Pem(0)
        );
        let v = JwtVerifier::builder("i", "a")
            .jwks_url("https://id.example.com/jwks")
            .unwrap()
            .build()
            .unwrap();
        assert!(algs(&v).is_empty());
    }

    /// A token verified once is kept and answered again; a token one byte off is not; and when
    /// the provider withdraws the key that verified it, the token is refused once the server
    /// holds the new key set, though it was verified before.
    #[cfg(feature = "test-util")]
    #[tokio::test]
    async fn a_verified_token_is_kept_until_its_key_is_withdrawn() {
        use crate::test_util::jwt::{JwksServer, KeyKind, TestIssuer, AUDIENCE, ISSUER};
        let issuer = TestIssuer::generate();
        let jwks =
            JwksServer::start(serde_json::json!({"keys": [issuer.jwk(KeyKind::Rsa, "k1")]})).await;
        let v = JwtVerifier::builder(ISSUER, AUDIENCE)
            .jwks_url(jwks.url())
            .unwrap()
            .refresh_cooldown(Duration::ZERO)
            .build()
            .unwrap();
        let old = issuer.sign(KeyKind::Rsa, Some("k1"), &issuer.claims("alice", "read"));
        let alice = v.verify(&old).await.unwrap();
        assert_eq!(alice.subject, "alice");
        assert_eq!(v.inner.verified.len(), 1, "kept");
        assert_eq!(v.verify(&old).await.unwrap(), alice);
        assert_eq!(v.inner.verified.len(), 1);
        // The same token with its signature's last character changed is another token.
        let mut forged = old.clone();
        let last = forged.pop().unwrap();
        forged.push(if last == 'A' { 'B' } else { 'A' });
        assert!(v.verify(&forged).await.is_err());
        // The provider rotates: k1 withdrawn, k2 published. A token of k2 makes the server
        // fetch the new set; from then on the token of k1 is refused.
        jwks.set(serde_json::json!({"keys": [issuer.jwk(KeyKind::Ec, "k2")]}));
        let new = issuer.sign(KeyKind::Ec, Some("k2"), &issuer.claims("bob", "read"));
        assert_eq!(v.verify(&new).await.unwrap().subject, "bob");
        assert_eq!(jwks.hits(), 2);
        let e = v.verify(&old).await.unwrap_err();
        assert!(matches!(e, JwtError::UnknownKey { .. }), "{e:?}");
    }

    /// A time claim that is not a number is refused, not taken for absent: `nbf` as a string
    /// passed jsonwebtoken 9's check (GHSA-h395-gr6q-cpjc), so a token meant for later was
    /// good now.
    #[cfg(feature = "test-util")]
    #[tokio::test]
    async fn a_time_claim_that_is_not_a_number_is_refused() {
        use crate::test_util::jwt::{now, KeyKind, TestIssuer, AUDIENCE, ISSUER};
        let issuer = TestIssuer::generate();
        let v = JwtVerifier::builder(ISSUER, AUDIENCE)
            .public_key_pem(issuer.public_pem(KeyKind::Ed))
            .unwrap()
            .build()
            .unwrap();
        let mut claims = issuer.claims("alice", "read");
        assert!(v
            .verify(&issuer.sign(KeyKind::Ed, None, &claims))
            .await
            .is_ok());
        claims["nbf"] = Value::String((now() + 86_400).to_string());
        let e = v
            .verify(&issuer.sign(KeyKind::Ed, None, &claims))
            .await
            .unwrap_err();
        assert!(matches!(&e, JwtError::Claim(c) if c == "nbf"), "{e:?}");
        // As a number, the same time is "not yet".
        claims["nbf"] = serde_json::json!(now() + 86_400);
        let e = v
            .verify(&issuer.sign(KeyKind::Ed, None, &claims))
            .await
            .unwrap_err();
        assert!(matches!(e, JwtError::NotYetValid), "{e:?}");
    }
}
