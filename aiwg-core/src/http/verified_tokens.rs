//! Bearer JWTs verified already, so that a client sending the same token on every request does
//! not pay a signature check on each (34–70 µs of RSA, ECDSA or Ed25519 verification on the
//! project's machine, against about 1 µs for an API key).
//!
//! A token is found by the SHA-256 of its whole text: a token that differs in one byte (its
//! signature, a claim) is another token, verified on its own. Only a token that passed every
//! check ([`JwtVerifier::verify`](super::JwtVerifier::verify)) is kept, with what it proved
//! (the identity), its time claims and the key set that verified it. It is answered from here
//! only while
//!
//! - its `exp` (and `nbf`) still hold now, with the verifier's leeway, checked at every use as
//!   the full verification checks them (an expired token is dropped and refused `Expired`);
//! - the key that verified it is still in use: a key of the verifier's own configuration, or
//!   the very JWKS key set held when it was verified. When the JWKS is fetched again (its
//!   maximum age passed, or a token named an unknown key id) every token verified by the
//!   former set is verified again against the new one, so a key the provider withdrew stops
//!   being accepted as soon as the server sees the new set.
//!
//! At most [`VERIFIED_MAX`] tokens are kept: when full, the expired ones are dropped, and if
//! none was, all of them. Refused tokens are never kept, so nobody without a valid token can
//! fill it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use sha2::{Digest, Sha256};

use super::jwt::{JwtError, JwtIdentity};

/// The most verified tokens kept.
pub(super) const VERIFIED_MAX: usize = 4096;

/// The SHA-256 of a token's text.
pub(super) type TokenDigest = [u8; 32];

/// The digest a token is kept under.
pub(super) fn digest(token: &str) -> TokenDigest {
    Sha256::digest(token.as_bytes()).into()
}

/// Which keys verified a token.
#[derive(Clone, Debug)]
pub(super) enum VerifiedBy<K> {
    /// A key of the verifier's own configuration (PEM): never replaced.
    Own,
    /// A key of this JWKS key set (held weakly: a set dropped is not kept alive, and its
    /// address is not reused while this is held).
    Published(Weak<K>),
}

/// A token's time claims, in seconds since the epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Times {
    pub(super) exp: u64,
    pub(super) nbf: Option<u64>,
}

impl Times {
    /// Whether the claims hold at `now` with `leeway`, as the full verification checks them
    /// (jsonwebtoken: expired when `exp < now - leeway`, not yet valid when
    /// `nbf > now + leeway`).
    pub(super) fn check(self, now: u64, leeway: u64) -> Result<(), JwtError> {
        if self.exp < now.saturating_sub(leeway) {
            return Err(JwtError::Expired);
        }
        if self.nbf.is_some_and(|nbf| nbf > now.saturating_add(leeway)) {
            return Err(JwtError::NotYetValid);
        }
        Ok(())
    }
}

struct Entry<K> {
    identity: JwtIdentity,
    times: Times,
    by: VerifiedBy<K>,
}

/// The verified tokens of one verifier. `K` is the verifier's JWKS key set.
pub(super) struct VerifiedTokens<K> {
    entries: Mutex<HashMap<TokenDigest, Entry<K>, foldhash::fast::RandomState>>,
}

impl<K> Default for VerifiedTokens<K> {
    fn default() -> Self {
        Self {
            entries: Mutex::default(),
        }
    }
}

impl<K> VerifiedTokens<K> {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<TokenDigest, Entry<K>, foldhash::fast::RandomState>>
    {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The identity of the token with digest `token`, when it was verified and still holds:
    /// its times at `now` (else the refusal, and the token is dropped), its key set `current`
    /// (the JWKS keys in use now; else `None`, the token dropped, to be verified again).
    pub(super) fn get(
        &self,
        token: &TokenDigest,
        current: Option<&Arc<K>>,
        now: u64,
        leeway: u64,
    ) -> Result<Option<JwtIdentity>, JwtError> {
        let mut entries = self.lock();
        let Some(entry) = entries.get(token) else {
            return Ok(None);
        };
        let same_keys = match &entry.by {
            VerifiedBy::Own => true,
            VerifiedBy::Published(set) => {
                current.is_some_and(|current| Weak::ptr_eq(set, &Arc::downgrade(current)))
            }
        };
        if !same_keys {
            entries.remove(token);
            return Ok(None);
        }
        if let Err(e) = entry.times.check(now, leeway) {
            entries.remove(token);
            return Err(e);
        }
        Ok(Some(entry.identity.clone()))
    }

    /// Keeps a token that was just verified. When full, the tokens expired at `now` go first,
    /// and if none had, every token.
    pub(super) fn insert(
        &self,
        token: TokenDigest,
        identity: JwtIdentity,
        times: Times,
        by: VerifiedBy<K>,
        now: u64,
        leeway: u64,
    ) {
        let mut entries = self.lock();
        if entries.len() >= VERIFIED_MAX && !entries.contains_key(&token) {
            entries.retain(|_, e| e.times.check(now, leeway).is_ok());
            if entries.len() >= VERIFIED_MAX {
                entries.clear();
            }
        }
        entries.insert(
            token,
            Entry {
                identity,
                times,
                by,
            },
        );
    }

    /// How many tokens are kept.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> JwtIdentity {
        JwtIdentity {
            subject: "alice".into(),
            scopes: Vec::new(),
        }
    }

    #[test]
    fn time_claims_are_checked_as_the_full_verification_checks_them() {
        let t = Times {
            exp: 1_000,
            nbf: Some(900),
        };
        assert!(t.check(1_000, 0).is_ok(), "good until its `exp` second");
        assert!(matches!(t.check(1_001, 0), Err(JwtError::Expired)));
        assert!(t.check(1_030, 30).is_ok(), "the leeway after `exp`");
        assert!(matches!(t.check(1_031, 30), Err(JwtError::Expired)));
        assert!(t.check(900, 0).is_ok());
        assert!(matches!(t.check(899, 0), Err(JwtError::NotYetValid)));
        assert!(t.check(870, 30).is_ok(), "the leeway before `nbf`");
        let no_nbf = Times { exp: 5, nbf: None };
        assert!(no_nbf.check(0, 0).is_ok());
    }

    #[test]
    fn a_token_is_answered_while_its_keys_and_times_hold() {
        let cache = VerifiedTokens::<Vec<u8>>::default();
        let keys = Arc::new(vec![1u8]);
        let token = digest("a.b.c");
        let times = Times {
            exp: 1_000,
            nbf: None,
        };
        cache.insert(
            token,
            alice(),
            times,
            VerifiedBy::Published(Arc::downgrade(&keys)),
            100,
            0,
        );
        assert_eq!(
            cache.get(&token, Some(&keys), 500, 0).unwrap(),
            Some(alice())
        );
        // Another token (one byte changed) is not this one.
        assert_eq!(
            cache.get(&digest("a.b.d"), Some(&keys), 500, 0).unwrap(),
            None
        );
        // Expired: refused and dropped.
        assert!(matches!(
            cache.get(&token, Some(&keys), 1_001, 0),
            Err(JwtError::Expired)
        ));
        assert_eq!(cache.len(), 0);
        // A new key set (the JWKS fetched again, even with the same keys): verified again.
        cache.insert(
            token,
            alice(),
            times,
            VerifiedBy::Published(Arc::downgrade(&keys)),
            100,
            0,
        );
        let fetched_again = Arc::new(vec![1u8]);
        assert_eq!(
            cache.get(&token, Some(&fetched_again), 500, 0).unwrap(),
            None
        );
        assert_eq!(cache.len(), 0, "dropped");
        assert_eq!(cache.get(&token, None, 500, 0).unwrap(), None);
        // A key of the verifier's own holds whatever the JWKS does.
        cache.insert(token, alice(), times, VerifiedBy::Own, 100, 0);
        assert_eq!(
            cache.get(&token, Some(&fetched_again), 500, 0).unwrap(),
            Some(alice())
        );
        assert_eq!(cache.get(&token, None, 500, 0).unwrap(), Some(alice()));
    }

    #[test]
    fn a_full_cache_drops_expired_tokens_first_and_else_everything() {
        let cache = VerifiedTokens::<Vec<u8>>::default();
        let at = |i: usize| digest(&format!("token {i}"));
        let times = |exp| Times { exp, nbf: None };
        // Half expire at 200, half at 2 000.
        for i in 0..VERIFIED_MAX {
            let exp = if i % 2 == 0 { 200 } else { 2_000 };
            cache.insert(at(i), alice(), times(exp), VerifiedBy::Own, 100, 0);
        }
        assert_eq!(cache.len(), VERIFIED_MAX);
        cache.insert(
            at(VERIFIED_MAX),
            alice(),
            times(2_000),
            VerifiedBy::Own,
            300,
            0,
        );
        assert_eq!(cache.len(), VERIFIED_MAX / 2 + 1, "the expired half went");
        assert!(cache.get(&at(1), None, 300, 0).unwrap().is_some());
        // Full of tokens that all hold: everything goes.
        for i in 0..VERIFIED_MAX {
            cache.insert(
                at(VERIFIED_MAX + 1 + i),
                alice(),
                times(2_000),
                VerifiedBy::Own,
                300,
                0,
            );
        }
        assert!(cache.len() <= VERIFIED_MAX);
        assert!(
            cache
                .get(&at(VERIFIED_MAX * 2), None, 300, 0)
                .unwrap()
                .is_some(),
            "the newest is kept"
        );
    }
}
