//! A test identity provider: signing keys made for the test and a JWKS document served over
//! real HTTP on loopback.
//!
//! [`TestIssuer::generate`] makes an RSA (2048 bits), an EC P-256 and an Ed25519 key pair with
//! the `openssl` command (in a temporary folder that goes with the issuer; nothing is
//! committed), signs tokens with any of them, and describes their public halves as JWKs.
//! [`JwksServer`] answers `GET` with the JWKS document it currently holds and counts the
//! requests, so a test sees when a verifier fetched it.
//!
//! ```no_run
//! use aiwg_core::test_util::jwt::{JwksServer, KeyKind, TestIssuer};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let issuer = TestIssuer::generate();
//! let jwks = JwksServer::start(serde_json::json!({"keys": [issuer.jwk(KeyKind::Rsa, "k1")]})).await;
//! let token = issuer.sign(KeyKind::Rsa, Some("k1"), &issuer.claims("alice", "read"));
//! # let _ = (jwks.url(), token);
//! # }
//! ```

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The issuer the test tokens name.
pub const ISSUER: &str = "https://issuer.test/";
/// The audience the test tokens name.
pub const AUDIENCE: &str = "aiwg";

/// Which of the issuer's keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// RSA 2048, RS256.
    Rsa,
    /// EC P-256, ES256.
    Ec,
    /// Ed25519, EdDSA.
    Ed,
}

impl KeyKind {
    fn alg(self) -> Algorithm {
        match self {
            KeyKind::Rsa => Algorithm::RS256,
            KeyKind::Ec => Algorithm::ES256,
            KeyKind::Ed => Algorithm::EdDSA,
        }
    }
}

struct Pair {
    private_pem: Vec<u8>,
    public_pem: String,
    public_der: Vec<u8>,
    /// RSA only: the modulus, big-endian.
    modulus: Vec<u8>,
}

/// Key pairs made for one test, and tokens signed with them.
pub struct TestIssuer {
    rsa: Pair,
    ec: Pair,
    ed: Pair,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for TestIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestIssuer").finish_non_exhaustive()
    }
}

fn openssl(args: &[&str], dir: &Path) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the `openssl` command runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn pair(dir: &Path, name: &str, genpkey: &[&str]) -> Pair {
    let private = format!("{name}.pem");
    let mut args = vec!["genpkey"];
    args.extend_from_slice(genpkey);
    args.extend_from_slice(&["-out", &private]);
    openssl(&args, dir);
    let public_pem = String::from_utf8(openssl(&["pkey", "-in", &private, "-pubout"], dir))
        .expect("PEM is text");
    let public_der = openssl(
        &["pkey", "-in", &private, "-pubout", "-outform", "DER"],
        dir,
    );
    let modulus = if name == "rsa" {
        let text = String::from_utf8(openssl(
            &["rsa", "-in", &private, "-modulus", "-noout"],
            dir,
        ))
        .expect("modulus is text");
        hex::decode(text.trim().trim_start_matches("Modulus=")).expect("modulus is hex")
    } else {
        Vec::new()
    };
    Pair {
        private_pem: std::fs::read(dir.join(&private)).expect("private key"),
        public_pem,
        public_der,
        modulus,
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Seconds since the Unix epoch.
#[must_use]
pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

impl TestIssuer {
    /// Makes the three key pairs (panics when `openssl` is missing: this is test code).
    #[must_use]
    pub fn generate() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let rsa = pair(
            dir.path(),
            "rsa",
            &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        );
        let ec = pair(
            dir.path(),
            "ec",
            &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
        );
        let ed = pair(dir.path(), "ed", &["-algorithm", "ED25519"]);
        Self {
            rsa,
            ec,
            ed,
            _dir: dir,
        }
    }

    fn pair(&self, kind: KeyKind) -> &Pair {
        match kind {
            KeyKind::Rsa => &self.rsa,
            KeyKind::Ec => &self.ec,
            KeyKind::Ed => &self.ed,
        }
    }

    /// The public key in PEM (for `auth.jwt.public_keys`).
    #[must_use]
    pub fn public_pem(&self, kind: KeyKind) -> &str {
        &self.pair(kind).public_pem
    }

    /// The public key as a JWK with key id `kid`.
    #[must_use]
    pub fn jwk(&self, kind: KeyKind, kid: &str) -> Value {
        let der = &self.pair(kind).public_der;
        match kind {
            KeyKind::Rsa => json!({"kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid,
                "n": b64(&self.rsa.modulus), "e": "AQAB"}),
            KeyKind::Ec => {
                // The SubjectPublicKeyInfo ends with the uncompressed point 04 || x || y.
                let point = &der[der.len() - 65..];
                json!({"kty": "EC", "use": "sig", "crv": "P-256", "kid": kid,
                    "x": b64(&point[1..33]), "y": b64(&point[33..])})
            }
            KeyKind::Ed => json!({"kty": "OKP", "crv": "Ed25519", "kid": kid,
                "x": b64(&der[der.len() - 32..])}),
        }
    }

    /// Claims for `sub` with `scope`, this issuer and audience, valid for an hour.
    #[must_use]
    pub fn claims(&self, sub: &str, scope: &str) -> Value {
        let now = now();
        json!({"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "scope": scope,
            "iat": now, "exp": now + 3600})
    }

    /// A token over `claims`, signed with the `kind` key, its header naming `kid`.
    #[must_use]
    pub fn sign(&self, kind: KeyKind, kid: Option<&str>, claims: &Value) -> String {
        let pem = &self.pair(kind).private_pem;
        let key = match kind {
            KeyKind::Rsa => EncodingKey::from_rsa_pem(pem),
            KeyKind::Ec => EncodingKey::from_ec_pem(pem),
            KeyKind::Ed => EncodingKey::from_ed_pem(pem),
        }
        .expect("signing key");
        let mut header = Header::new(kind.alg());
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, &key).expect("signed")
    }

    /// An HS256 token whose HMAC secret is the `kind` key's public PEM: the HS/RS confusion
    /// attack against verifiers that let the token pick the algorithm.
    #[must_use]
    pub fn confused(&self, kind: KeyKind, kid: Option<&str>, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = kid.map(str::to_owned);
        let key = EncodingKey::from_secret(self.public_pem(kind).as_bytes());
        jsonwebtoken::encode(&header, claims, &key).expect("signed")
    }

    /// An unsigned token (`alg: none`, empty signature).
    #[must_use]
    pub fn unsigned(claims: &Value) -> String {
        let header = b64(br#"{"alg":"none","typ":"JWT"}"#);
        let payload = b64(claims.to_string().as_bytes());
        format!("{header}.{payload}.")
    }
}

/// A JWKS document served over HTTP on `127.0.0.1`, replaceable while it runs.
pub struct JwksServer {
    url: String,
    body: Arc<Mutex<String>>,
    hits: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for JwksServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksServer")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl JwksServer {
    /// Serves `jwks` at `http://127.0.0.1:<port>/jwks.json`.
    pub async fn start(jwks: Value) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let body = Arc::new(Mutex::new(jwks.to_string()));
        let hits = Arc::new(AtomicU64::new(0));
        let (b, h) = (body.clone(), hits.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let (b, h) = (b.clone(), h.clone());
                tokio::spawn(async move {
                    // Read the request head, then answer and close.
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                        if head.len() > 16 * 1024 {
                            return;
                        }
                    }
                    h.fetch_add(1, Ordering::SeqCst);
                    let body = b.lock().map(|s| s.clone()).unwrap_or_default();
                    let res = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(res.as_bytes()).await;
                    let _ = conn.shutdown().await;
                });
            }
        });
        Self {
            url: format!("http://{addr}/jwks.json"),
            body,
            hits,
            task,
        }
    }

    /// The document's URL.
    #[must_use]
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Serves `jwks` from now on.
    pub fn set(&self, jwks: Value) {
        if let Ok(mut b) = self.body.lock() {
            *b = jwks.to_string();
        }
    }

    /// How many requests it has answered.
    #[must_use]
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
