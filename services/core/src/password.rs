//! Verifying SMTP AUTH passwords against the value stored in an account's Secret.

use argon2::{Argon2, PasswordHash, PasswordVerifier};
use subtle::ConstantTimeEq;

/// A stored credential: an Argon2 PHC hash (`$argon2id$...`) or, for simple setups, the
/// password itself. Plain values are compared in constant time.
#[derive(Clone)]
pub struct StoredPassword(String);

impl StoredPassword {
    pub fn new(stored: impl Into<String>) -> Self {
        StoredPassword(stored.into())
    }

    pub fn verify(&self, offered: &str) -> bool {
        if self.0.starts_with("$argon2") {
            match PasswordHash::new(&self.0) {
                Ok(hash) => Argon2::default()
                    .verify_password(offered.as_bytes(), &hash)
                    .is_ok(),
                Err(_) => false,
            }
        } else {
            self.0.as_bytes().ct_eq(offered.as_bytes()).into()
        }
    }
}

impl std::fmt::Debug for StoredPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoredPassword(..)")
    }
}

/// Hashes a password for storage (used by `herald hash-password`).
pub fn hash(password: &str) -> Result<String, String> {
    use argon2::password_hash::{PasswordHasher, SaltString, rand_core::OsRng};
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_hashed_passwords_verify() {
        assert!(StoredPassword::new("s3cret").verify("s3cret"));
        assert!(!StoredPassword::new("s3cret").verify("s3cre"));
        assert!(!StoredPassword::new("s3cret").verify("s3cret!"));
        let h = hash("hunter2").expect("hash");
        assert!(StoredPassword::new(h.clone()).verify("hunter2"));
        assert!(!StoredPassword::new(h).verify("hunter3"));
        assert!(!StoredPassword::new("$argon2id$garbage").verify("x"));
    }
}
