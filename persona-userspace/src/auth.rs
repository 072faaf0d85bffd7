//! Bearer tokens: `persona_<id>_<secret>`. Only a SHA-256 digest of the secret is
//! stored, compared in constant time: the secret is 192 random bits, so a password
//! hash's cost would buy nothing, and would let anyone who knows a token's id (they
//! appear in the audit log) make the daemon burn a CPU per request. Tokens made by
//! earlier versions keep their argon2 hash. Tokens that verified are remembered in
//! memory until revoked.
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use argon2::{Argon2, PasswordVerifier as _};
use subtle::ConstantTimeEq as _;

use crate::store::{Role, Store, StoreError, TokenRecord};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub token_id: String,
    pub role: Role,
}

impl Caller {
    pub fn actor(&self) -> String {
        format!("token:{}", self.token_id)
    }

    pub fn require(&self, role: Role) -> Result<(), AuthError> {
        if self.role >= role {
            Ok(())
        } else {
            Err(AuthError::Forbidden {
                have: self.role,
                need: role,
            })
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("a bearer token is required (Authorization: Bearer persona_...)")]
    Missing,
    #[error("the token is not valid")]
    Invalid,
    #[error("the token was revoked")]
    Revoked,
    #[error("this needs the {need:?} role; the token has {have:?}")]
    Forbidden { have: Role, need: Role },
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub struct Auth {
    store: Arc<dyn Store>,
    verified: Mutex<HashMap<String, Caller>>,
    /// Counts revocations: a verification that read its token before one is not
    /// remembered, so that a revoke landing meanwhile wins.
    revocations: AtomicU64,
}

fn digest(secret: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// Whether `secret` is the one `stored` was made from.
fn matches(secret: &str, stored: &str) -> bool {
    if stored.starts_with("sha256:") {
        return digest(secret).as_bytes().ct_eq(stored.as_bytes()).into();
    }
    argon2::PasswordHash::new(stored).is_ok_and(|h| {
        Argon2::default()
            .verify_password(secret.as_bytes(), &h)
            .is_ok()
    })
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).expect("the kernel's random source");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

impl Auth {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            verified: Mutex::new(HashMap::new()),
            revocations: AtomicU64::new(0),
        }
    }

    /// Creates a token; its secret is in the returned string and nowhere else.
    pub fn create(
        &self,
        role: Role,
        description: &str,
    ) -> Result<(TokenRecord, String), AuthError> {
        let id = random_hex(4);
        let secret = random_hex(24);
        let hash = digest(&secret);
        let record = TokenRecord {
            id: id.clone(),
            role,
            description: description.to_owned(),
            created: jiff::Timestamp::now(),
            revoked: false,
            hash,
        };
        self.store.put_token(&record)?;
        Ok((record, format!("persona_{id}_{secret}")))
    }

    /// The caller of a token that verified before and was not revoked since.
    pub fn cached(&self, token: &str) -> Option<Caller> {
        self.verified
            .lock()
            .expect("auth cache")
            .get(token)
            .cloned()
    }

    pub fn verify(&self, token: &str) -> Result<Caller, AuthError> {
        if let Some(c) = self.cached(token) {
            return Ok(c);
        }
        let (id, secret) = token
            .strip_prefix("persona_")
            .and_then(|rest| rest.split_once('_'))
            .ok_or(AuthError::Invalid)?;
        let revocations = self.revocations.load(Ordering::SeqCst);
        let record = self.store.token(id)?.ok_or(AuthError::Invalid)?;
        if !matches(secret, &record.hash) {
            return Err(AuthError::Invalid);
        }
        if record.revoked {
            return Err(AuthError::Revoked);
        }
        let caller = Caller {
            token_id: record.id,
            role: record.role,
        };
        let mut verified = self.verified.lock().expect("auth cache");
        if self.revocations.load(Ordering::SeqCst) == revocations {
            verified.insert(token.to_owned(), caller.clone());
        }
        Ok(caller)
    }

    pub fn revoke(&self, id: &str) -> Result<TokenRecord, AuthError> {
        let mut record = self.store.token(id)?.ok_or_else(|| StoreError::NotFound {
            kind: "Token",
            name: id.into(),
        })?;
        record.revoked = true;
        self.store.put_token(&record)?;
        let mut verified = self.verified.lock().expect("auth cache");
        self.revocations.fetch_add(1, Ordering::SeqCst);
        verified.retain(|_, c| c.token_id != id);
        Ok(record)
    }

    pub fn list(&self) -> Result<Vec<TokenRecord>, AuthError> {
        Ok(self.store.tokens()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;

    #[test]
    fn tokens_verify_by_role_and_stop_when_revoked() {
        let dir = std::env::temp_dir().join(format!("persona-auth-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Arc::new(EmbeddedStore::open(&dir.join("s.redb")).unwrap());
        let auth = Auth::new(store.clone());
        let (record, token) = auth.create(Role::Operator, "ci").unwrap();
        assert!(
            !record.hash.contains(token.rsplit('_').next().unwrap()),
            "the secret is not stored"
        );
        assert!(record.hash.starts_with("sha256:"), "{}", record.hash);
        let caller = auth.verify(&token).unwrap();
        assert_eq!(caller.role, Role::Operator);
        assert!(caller.require(Role::Viewer).is_ok());
        assert!(matches!(
            caller.require(Role::Admin),
            Err(AuthError::Forbidden { .. })
        ));
        let mut wrong = token.clone();
        wrong.pop();
        wrong.push('x');
        assert!(matches!(auth.verify(&wrong), Err(AuthError::Invalid)));
        assert!(matches!(
            auth.verify("persona_nope_nope"),
            Err(AuthError::Invalid)
        ));
        assert!(matches!(auth.verify("garbage"), Err(AuthError::Invalid)));
        auth.revoke(&record.id).unwrap();
        assert!(matches!(auth.verify(&token), Err(AuthError::Revoked)));
        // A fresh process (no cache) refuses it too.
        assert!(matches!(
            Auth::new(store.clone()).verify(&token),
            Err(AuthError::Revoked)
        ));
        // A token an earlier version made, with an argon2 hash, still verifies.
        use argon2::PasswordHasher as _;
        let legacy = TokenRecord {
            id: "0ld0ld00".into(),
            role: Role::Viewer,
            description: "made by 0.1".into(),
            created: jiff::Timestamp::now(),
            revoked: false,
            hash: Argon2::default()
                .hash_password(b"s3cret")
                .unwrap()
                .to_string(),
        };
        store.put_token(&legacy).unwrap();
        assert_eq!(
            auth.verify("persona_0ld0ld00_s3cret").unwrap().role,
            Role::Viewer
        );
        assert!(matches!(
            auth.verify("persona_0ld0ld00_s3cre7"),
            Err(AuthError::Invalid)
        ));
    }

    /// Verifications race a revoke from 8 threads: every one of the 1,000 that began
    /// after the revoke returned is refused, the cache notwithstanding.
    #[test]
    fn a_revoke_wins_the_race_with_concurrent_verifications() {
        use std::sync::atomic::AtomicBool;
        let dir = std::env::temp_dir().join(format!("persona-auth-race-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Arc::new(EmbeddedStore::open(&dir.join("s.redb")).unwrap());
        let auth = Arc::new(Auth::new(store));
        let (record, token) = auth.create(Role::Admin, "raced").unwrap();
        let revoked = Arc::new(AtomicBool::new(false));
        let ready = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (auth, token, revoked) = (auth.clone(), token.clone(), revoked.clone());
                let ready = ready.clone();
                std::thread::spawn(move || {
                    let (mut before, mut after) = (0, 0);
                    // 125 each after the revoke: 1,000 in all.
                    while after < 125 {
                        let after_revoke = revoked.load(Ordering::SeqCst);
                        let ok = auth.verify(&token).is_ok();
                        if after_revoke {
                            after += 1;
                            assert!(!ok, "verified after the revoke returned");
                        } else if ok {
                            before += 1;
                            if before == 1 {
                                ready.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                    }
                    (before, after)
                })
            })
            .collect();
        // Every thread verifying (and the token cached) before the revoke.
        while ready.load(Ordering::SeqCst) < 8 {
            std::thread::yield_now();
        }
        auth.revoke(&record.id).unwrap();
        revoked.store(true, Ordering::SeqCst);
        let (mut before, mut after) = (0, 0);
        for t in threads {
            let (b, a) = t.join().unwrap();
            before += b;
            after += a;
        }
        assert!(before > 0 && after > 0, "{before} before, {after} after");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
