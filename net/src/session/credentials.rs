//! Verified tokens, shared: every connection and channel of one shard that presents the same
//! token text under the same tenant holds one [`Credential`] (token text and claims), and a
//! token seen before is not verified again while it is unexpired.
//!
//! Why: a joined channel keeps its token and claims for life (private-channel and RLS checks,
//! token refresh, expiry), and a connection keeps its token as the channels' fallback; kept per
//! channel they were ≈ 700 bytes of every idle joined connection, although most clients of a
//! project present one of few tokens (the anon key above all). Verifying (HMAC or signature,
//! base64, JSON) is also most of a join's own CPU.
//!
//! Bound: the table holds weak entries only, one per distinct token text; dead entries are
//! pruned whenever the table has doubled since the last pruning, so it never holds more than
//! twice the credentials alive plus [`PRUNE_FLOOR`].
//!
//! Correctness: a credential is a pure function of the token text and the tenant's keys, except
//! for expiry, which every reuse checks against the caller's clock (an expired one is verified
//! again, which yields the exact error). The owner clears the table whenever the tenant's
//! configuration changes ([`Credentials::clear`]), so nothing verified under old keys is reused.

use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};

use ahash::AHashMap;
use auth::{AuthError, Claims, KeyStore};

/// Entries kept before the first pruning.
const PRUNE_FLOOR: usize = 64;

/// A verified token and its claims.
pub struct Credential {
    /// The token as presented (cleaned).
    pub token: Box<str>,
    /// What verifying it gave.
    pub claims: Claims,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential").field("token", &"<redacted>").field("claims", &self.claims).finish()
    }
}

impl Credential {
    /// Whether the credential is still valid at `now_secs` (its expiry is in the future).
    pub fn unexpired(&self, now_secs: i64) -> bool {
        self.claims.exp > now_secs
    }
}

/// One shard's verified tokens for one tenant.
#[derive(Debug, Default)]
pub struct Credentials {
    table: RefCell<AHashMap<Box<str>, Weak<Credential>>>,
    /// Table size after the last pruning.
    pruned_at: Cell<usize>,
}

impl Credentials {
    /// The credential for `token` (cleaned): shared when a live one exists and is unexpired,
    /// else verified with `keys` at `now_secs`.
    pub fn verify(&self, keys: &KeyStore, token: &str, now_secs: i64) -> Result<Rc<Credential>, AuthError> {
        if let Some(shared) = self.table.borrow().get(token).and_then(Weak::upgrade) {
            if shared.unexpired(now_secs) {
                return Ok(shared);
            }
        }
        let claims = keys.verify(token, now_secs)?;
        let credential = Rc::new(Credential { token: token.into(), claims });
        let mut table = self.table.borrow_mut();
        if table.len() >= (2 * self.pruned_at.get()).max(PRUNE_FLOOR) {
            table.retain(|_, weak| weak.strong_count() > 0);
            self.pruned_at.set(table.len());
        }
        table.insert(token.into(), Rc::downgrade(&credential));
        Ok(credential)
    }

    /// Forgets every entry (the tenant's keys or gates changed).
    pub fn clear(&self) {
        self.table.borrow_mut().clear();
        self.pruned_at.set(0);
    }

    /// Entries held (live or not yet pruned).
    pub fn len(&self) -> usize {
        self.table.borrow().len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.table.borrow().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECRET: &[u8] = b"credentials-test-secret";

    fn token(role: &str, exp: i64) -> String {
        auth::sign_hs256(SECRET, json!({"role": role, "exp": exp}).as_object().expect("an object"))
    }

    #[test]
    fn the_same_token_is_one_credential_while_it_is_alive_and_unexpired() {
        let keys = KeyStore::new(SECRET.to_vec());
        let credentials = Credentials::default();
        let anon = token("anon", 1_000);
        let a = credentials.verify(&keys, &anon, 100).expect("valid");
        let b = credentials.verify(&keys, &anon, 200).expect("valid");
        assert!(Rc::ptr_eq(&a, &b));
        assert_eq!(b.claims.role, "anon");
        // Expired by one second: verified again, with the verifier's own error.
        assert!(matches!(credentials.verify(&keys, &anon, 1_000), Err(AuthError::Expired { seconds_ago: 0 })));
        // Another token is another credential.
        let other = credentials.verify(&keys, &token("authenticated", 1_000), 100).expect("valid");
        assert!(!Rc::ptr_eq(&a, &other));
        // Once nothing holds it, it is verified again (a new credential).
        drop((a, b));
        let again = credentials.verify(&keys, &anon, 100).expect("valid");
        assert_eq!(again.claims.role, "anon");
        assert_eq!(Rc::strong_count(&again), 1);
    }

    #[test]
    fn a_token_under_other_keys_is_not_reused_after_clear() {
        let keys = KeyStore::new(SECRET.to_vec());
        let credentials = Credentials::default();
        let anon = token("anon", 1_000);
        let kept = credentials.verify(&keys, &anon, 100).expect("valid");
        credentials.clear();
        let rotated = KeyStore::new(b"another-secret".to_vec());
        assert!(credentials.verify(&rotated, &anon, 100).is_err());
        drop(kept);
    }

    #[test]
    fn dead_entries_are_pruned_so_the_table_stays_bounded() {
        let keys = KeyStore::new(SECRET.to_vec());
        let credentials = Credentials::default();
        let alive: Vec<_> = (0..10).map(|i| credentials.verify(&keys, &token(&format!("r{i}"), 1_000), 100).expect("valid")).collect();
        for i in 0..10_000 {
            let _dropped = credentials.verify(&keys, &token(&format!("x{i}"), 1_000), 100).expect("valid");
            assert!(credentials.len() <= 2 * alive.len() + PRUNE_FLOOR + 1, "{} entries", credentials.len());
        }
        for credential in &alive {
            let again = credentials.verify(&keys, &credential.token, 100).expect("valid");
            assert!(Rc::ptr_eq(credential, &again));
        }
    }
}
