//! Bearer tokens: `persona_<id>_<secret>`. Only a salted argon2 hash of the secret is
//! stored. Verification is deliberately slow, so tokens that verified are remembered in
//! memory until revoked.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use argon2::{Argon2, PasswordHasher as _, PasswordVerifier as _};

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
        let hash = Argon2::default()
            .hash_password(secret.as_bytes())
            .map_err(|e| StoreError::Backend(format!("hashing a token: {e}")))?
            .to_string();
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

    pub fn verify(&self, token: &str) -> Result<Caller, AuthError> {
        if let Some(c) = self.verified.lock().expect("auth cache").get(token) {
            return Ok(c.clone());
        }
        let (id, secret) = token
            .strip_prefix("persona_")
            .and_then(|rest| rest.split_once('_'))
            .ok_or(AuthError::Invalid)?;
        let record = self.store.token(id)?.ok_or(AuthError::Invalid)?;
        Argon2::default()
            .verify_password(secret.as_bytes(), record.hash.as_str())
            .map_err(|_| AuthError::Invalid)?;
        if record.revoked {
            return Err(AuthError::Revoked);
        }
        let caller = Caller {
            token_id: record.id,
            role: record.role,
        };
        self.verified
            .lock()
            .expect("auth cache")
            .insert(token.to_owned(), caller.clone());
        Ok(caller)
    }

    pub fn revoke(&self, id: &str) -> Result<TokenRecord, AuthError> {
        let mut record = self.store.token(id)?.ok_or_else(|| StoreError::NotFound {
            kind: "Token",
            name: id.into(),
        })?;
        record.revoked = true;
        self.store.put_token(&record)?;
        self.verified
            .lock()
            .expect("auth cache")
            .retain(|_, c| c.token_id != id);
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
        assert!(record.hash.starts_with("$argon2id$"));
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
            Auth::new(store).verify(&token),
            Err(AuthError::Revoked)
        ));
    }
}
