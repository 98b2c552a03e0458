//! API keys with scopes, compared in constant time, and per-key / per-address rate limits.

use std::fmt;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What a key may do. `admin` implies every other scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Start jobs.
    Trigger,
    /// Read jobs, events, workflows, status and metrics.
    Read,
    /// Cancel jobs.
    Cancel,
    /// Approve or reject a job waiting before a step with `approval: required`.
    Approve,
    /// Everything, including webhook subscriptions.
    Admin,
}

impl FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "trigger" => Ok(Scope::Trigger),
            "read" => Ok(Scope::Read),
            "cancel" => Ok(Scope::Cancel),
            "approve" => Ok(Scope::Approve),
            "admin" => Ok(Scope::Admin),
            other => Err(format!(
                "unknown scope `{other}` (expected trigger, read, cancel, approve or admin)"
            )),
        }
    }
}

/// A key that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The plain key is shorter than 16 characters.
    #[error("API key `{0}` is shorter than 16 characters")]
    TooShort(String),
    /// The SHA-256 form is not 64 hex digits.
    #[error("API key `{0}` has a sha256 that is not 64 hex digits")]
    BadHash(String),
    /// The key has no scopes.
    #[error("API key `{0}` has no scopes")]
    NoScopes(String),
}

/// An API key: a name, the SHA-256 of the secret, and scopes. The secret itself is never kept.
#[derive(Clone)]
pub struct ApiKey {
    name: String,
    hash: [u8; 32],
    scopes: Vec<Scope>,
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey")
            .field("name", &self.name)
            .field("scopes", &self.scopes)
            .finish_non_exhaustive()
    }
}

impl ApiKey {
    /// A key from its plain secret (at least 16 characters).
    pub fn plain(
        name: impl Into<String>,
        secret: &str,
        scopes: Vec<Scope>,
    ) -> Result<Self, KeyError> {
        let name = name.into();
        if secret.chars().count() < 16 {
            return Err(KeyError::TooShort(name));
        }
        Self::checked(name, Sha256::digest(secret.as_bytes()).into(), scopes)
    }

    /// A key from the hex SHA-256 of its secret, so the configuration never holds the secret.
    pub fn sha256(
        name: impl Into<String>,
        hex_digest: &str,
        scopes: Vec<Scope>,
    ) -> Result<Self, KeyError> {
        let name = name.into();
        let mut hash = [0u8; 32];
        hex::decode_to_slice(hex_digest.trim(), &mut hash)
            .map_err(|_| KeyError::BadHash(name.clone()))?;
        Self::checked(name, hash, scopes)
    }

    /// The hex SHA-256 of a key's secret: what `key_sha256` in the configuration (and
    /// [`ApiKey::sha256`]) takes, so the configuration never holds the secret. The example
    /// server prints it with `server hash-key` (the key read from standard input).
    #[must_use]
    pub fn hash_hex(secret: &str) -> String {
        hex::encode(Sha256::digest(secret.as_bytes()))
    }

    fn checked(name: String, hash: [u8; 32], scopes: Vec<Scope>) -> Result<Self, KeyError> {
        if scopes.is_empty() {
            return Err(KeyError::NoScopes(name));
        }
        Ok(Self { name, hash, scopes })
    }

    /// The key's name (used as the actor and the rate-limit bucket).
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The scopes it was given (`admin` implies the others).
    #[must_use]
    pub fn scopes(&self) -> &[Scope] {
        &self.scopes
    }

    /// Whether the key grants `scope`.
    #[must_use]
    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes
            .iter()
            .any(|s| *s == scope || *s == Scope::Admin)
    }
}

/// Who made a request: an API key, or the subject of a verified JWT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Caller {
    name: String,
    scopes: Vec<Scope>,
    jwt: bool,
}

impl Caller {
    pub(crate) fn key(key: &ApiKey) -> Self {
        Self {
            name: key.name.clone(),
            scopes: key.scopes.clone(),
            jwt: false,
        }
    }

    pub(crate) fn jwt(id: super::jwt::JwtIdentity) -> Self {
        Self {
            name: id.subject,
            scopes: id.scopes,
            jwt: true,
        }
    }

    /// The key's name or the token's `sub`: the actor of the jobs it triggers.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Its scopes (`admin` implies the others).
    pub(crate) fn scopes(&self) -> &[Scope] {
        &self.scopes
    }

    /// What keys its rate limit, idempotency keys and audit records: the key's name, or
    /// `jwt:<sub>` so a token's subject never shares them with a key of the same name.
    pub(crate) fn bucket(&self) -> String {
        if self.jwt {
            format!("jwt:{}", self.name)
        } else {
            self.name.clone()
        }
    }

    /// What the caller is, for messages: "the API key `ci`" or "the token of `alice`".
    pub(crate) fn describe(&self) -> String {
        if self.jwt {
            format!("the token of `{}`", self.name)
        } else {
            format!("the API key `{}`", self.name)
        }
    }

    /// Whether it grants `scope`.
    pub(crate) fn allows(&self, scope: Scope) -> bool {
        self.scopes
            .iter()
            .any(|s| *s == scope || *s == Scope::Admin)
    }
}

/// Finds the key matching a presented secret. Every configured key is compared, in constant
/// time, whatever matches, so timing says nothing about which or how many keys exist.
pub(crate) fn find_key<'a>(keys: &'a [ApiKey], presented: &str) -> Option<&'a ApiKey> {
    let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    let mut found = None;
    for k in keys {
        if bool::from(k.hash.ct_eq(&digest)) {
            found = Some(k);
        }
    }
    found
}

/// Requests per minute with a burst, per key and per client address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Sustained requests per minute.
    pub per_minute: u32,
    /// Requests allowed at once.
    pub burst: u32,
}

pub(crate) struct Limiter {
    keys: DefaultKeyedRateLimiter<String>,
    addrs: DefaultKeyedRateLimiter<IpAddr>,
    checks: std::sync::atomic::AtomicU64,
    /// Addresses whose failed platform verifications ran over the limit, until when.
    blocked: std::sync::Mutex<std::collections::HashMap<IpAddr, std::time::Instant>>,
    /// WebSockets waiting for their credentials (upgraded without an `Authorization` header),
    /// per address: at most `burst` at once.
    waiting: std::sync::Mutex<std::collections::HashMap<IpAddr, u32>>,
    burst: u32,
}

/// The address a client is counted under: an IPv4 address itself (an IPv4-mapped IPv6
/// address too), an IPv6 address by its /64, the smallest block a host is usually given. Counted
/// one by one, a host could take a fresh address of its /64 for every request and never meet
/// its limit.
pub(crate) fn bucket_of(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(v6) & !u128::from(u64::MAX),
            )),
        },
    }
}

/// Every this many address checks, addresses whose budget is full again are forgotten, so
/// rotating client addresses cannot grow the limiter's memory without bound.
const PRUNE_EVERY: u64 = 4096;

impl Limiter {
    pub(crate) fn new(limit: RateLimit) -> Result<Self, String> {
        let per_minute =
            NonZeroU32::new(limit.per_minute).ok_or("per_minute must be at least 1")?;
        let burst = NonZeroU32::new(limit.burst).ok_or("burst must be at least 1")?;
        let quota = Quota::per_minute(per_minute).allow_burst(burst);
        Ok(Self {
            keys: DefaultKeyedRateLimiter::keyed(quota),
            addrs: DefaultKeyedRateLimiter::keyed(quota),
            checks: std::sync::atomic::AtomicU64::new(0),
            blocked: std::sync::Mutex::default(),
            waiting: std::sync::Mutex::default(),
            burst: burst.get(),
        })
    }

    /// `Err(wait)` when the key is over its limit.
    pub(crate) fn check_key(&self, key: &str) -> Result<(), Duration> {
        self.keys
            .check_key(&key.to_owned())
            .map_err(|nu| nu.wait_time_from(DefaultClock::default().now()))
    }

    /// `Err(wait)` when the address is over its limit.
    pub(crate) fn check_addr(&self, addr: IpAddr) -> Result<(), Duration> {
        let addr = bucket_of(addr);
        let n = self
            .checks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n % PRUNE_EVERY == PRUNE_EVERY - 1 {
            self.prune();
        }
        self.addrs
            .check_key(&addr)
            .map_err(|nu| nu.wait_time_from(DefaultClock::default().now()))
    }
}

impl Limiter {
    /// Platform deliveries: only failed verifications count against an address, so verified
    /// deliveries are never starved by others' floods. `Err(wait)` while the address is
    /// blocked for failing too often (answered before any signature is computed).
    pub(crate) fn check_blocked(&self, addr: IpAddr) -> Result<(), Duration> {
        let addr = bucket_of(addr);
        let now = std::time::Instant::now();
        let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        match blocked.get(&addr) {
            Some(until) if *until > now => Err(*until - now),
            Some(_) => {
                blocked.remove(&addr);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Counts one failed verification (a platform's signature, an API key or token) from
    /// `addr`; past the limit the address is blocked for the wait the limiter names, which is
    /// answered as `Err`.
    pub(crate) fn failed_verification(&self, addr: IpAddr) -> Result<(), Duration> {
        let Err(wait) = self.check_addr(addr) else {
            return Ok(());
        };
        let addr = bucket_of(addr);
        let now = std::time::Instant::now();
        let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        if blocked.len() >= 65_536 {
            blocked.retain(|_, until| *until > now);
        }
        blocked.insert(addr, now + wait.max(Duration::from_millis(1)));
        Err(wait)
    }

    /// Takes one of the address's places for a WebSocket waiting for its credentials: `false`
    /// when its `burst` places are all taken. Every socket that waits would count as a failed
    /// verification if it never authenticated, but only at its deadline; without this an
    /// address could hold any number of sockets (and their tasks) open until then.
    pub(crate) fn wait_for_credentials(&self, addr: IpAddr) -> bool {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        let n = waiting.entry(bucket_of(addr)).or_insert(0);
        if *n >= self.burst {
            return false;
        }
        *n += 1;
        true
    }

    /// Gives back a place [`wait_for_credentials`](Self::wait_for_credentials) took.
    pub(crate) fn done_waiting(&self, addr: IpAddr) {
        let addr = bucket_of(addr);
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = waiting.get_mut(&addr) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                waiting.remove(&addr);
            }
        }
    }

    /// Forgets addresses and keys whose budget is full again (they would start fresh anyway).
    pub(crate) fn prune(&self) {
        self.addrs.retain_recent();
        self.addrs.shrink_to_fit();
        self.keys.retain_recent();
        self.keys.shrink_to_fit();
    }

    /// How many addresses the limiter remembers.
    #[cfg(test)]
    fn addresses(&self) -> usize {
        self.addrs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotating_addresses_do_not_grow_the_limiter_without_bound() {
        // A budget that is full again within microseconds, so pruning can forget at once.
        let l = Limiter::new(RateLimit {
            per_minute: 60_000_000,
            burst: 1,
        })
        .unwrap();
        for i in 0..20_000u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            assert!(l.check_addr(ip).is_ok());
        }
        // Pruned every 4096 checks: far fewer than 20 000 addresses are remembered.
        assert!(l.addresses() < 10_000, "{}", l.addresses());
        std::thread::sleep(Duration::from_millis(5));
        l.prune();
        assert_eq!(l.addresses(), 0);
    }

    #[test]
    fn keys_match_by_hash_and_scopes_imply() {
        let plain = ApiKey::plain("ci", "0123456789abcdef-secret", vec![Scope::Trigger]).unwrap();
        let hex = hex::encode(Sha256::digest(b"another-long-secret-value"));
        let hashed = ApiKey::sha256("ops", &hex, vec![Scope::Admin]).unwrap();
        assert_eq!(ApiKey::hash_hex("another-long-secret-value"), hex);
        let keys = vec![plain, hashed];
        assert_eq!(
            find_key(&keys, "0123456789abcdef-secret").unwrap().name(),
            "ci"
        );
        assert_eq!(
            find_key(&keys, "another-long-secret-value").unwrap().name(),
            "ops"
        );
        assert!(find_key(&keys, "0123456789abcdef-secreT").is_none());
        assert!(find_key(&keys, "").is_none());
        assert!(keys[0].allows(Scope::Trigger) && !keys[0].allows(Scope::Read));
        assert!(keys[1].allows(Scope::Read) && keys[1].allows(Scope::Cancel));
        assert!(!format!("{:?}", keys[0]).contains("secret"));
    }

    #[test]
    fn bad_keys_are_refused() {
        assert_eq!(
            ApiKey::plain("a", "short", vec![Scope::Read]).unwrap_err(),
            KeyError::TooShort("a".into())
        );
        assert_eq!(
            ApiKey::sha256("b", "zz", vec![Scope::Read]).unwrap_err(),
            KeyError::BadHash("b".into())
        );
        assert_eq!(
            ApiKey::plain("c", "0123456789abcdef", vec![]).unwrap_err(),
            KeyError::NoScopes("c".into())
        );
        assert!("root".parse::<Scope>().is_err());
    }

    #[test]
    fn limiter_refuses_past_the_burst_with_a_wait() {
        let l = Limiter::new(RateLimit {
            per_minute: 60,
            burst: 2,
        })
        .unwrap();
        assert!(l.check_key("k").is_ok());
        assert!(l.check_key("k").is_ok());
        let wait = l.check_key("k").unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1));
        assert!(l.check_key("other").is_ok());
        assert!(Limiter::new(RateLimit {
            per_minute: 0,
            burst: 1
        })
        .is_err());
    }
}
