//! The suppression list: per account, recipients that hard-bounced. Delivery adds them and
//! skips them; ingress refuses them at RCPT. Kept in NATS KV; entries expire after
//! `delivery.suppression_ttl`.

use std::time::Duration;

use async_nats::jetstream::{self, kv, stream::StorageType};
use sha2::{Digest, Sha256};

use crate::Error;

pub const SUPPRESSION_BUCKET: &str = "HERALD_SUPPRESSION";

#[derive(Clone)]
pub struct Suppression {
    store: kv::Store,
}

/// Key of one (account, recipient): addresses hold characters KV keys do not allow.
fn key(account: &str, recipient: &str) -> String {
    let digest = Sha256::digest(recipient.to_lowercase().as_bytes());
    format!(
        "{}.{}",
        account.replace(['/', '.', ' ', '*', '>', ':'], "_"),
        hex::encode(&digest[..16])
    )
}

impl Suppression {
    pub async fn setup(
        js: &jetstream::Context,
        replicas: usize,
        ttl: Duration,
    ) -> Result<Suppression, Error> {
        let store = js
            .create_or_update_key_value(kv::Config {
                bucket: SUPPRESSION_BUCKET.into(),
                description: "Hard-bounced recipients per account".into(),
                history: 1,
                max_age: ttl,
                storage: StorageType::File,
                num_replicas: replicas.max(1),
                ..Default::default()
            })
            .await
            .map_err(|e| Error::Nats(format!("bucket {SUPPRESSION_BUCKET}: {e}")))?;
        Ok(Suppression { store })
    }

    /// The reason `recipient` is suppressed for `account`, if it is.
    pub async fn reason(&self, account: &str, recipient: &str) -> Result<Option<String>, Error> {
        Ok(self
            .store
            .get(key(account, recipient))
            .await
            .map_err(Error::nats)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    pub async fn add(&self, account: &str, recipient: &str, reason: &str) -> Result<(), Error> {
        self.store
            .put(key(account, recipient), reason.to_string().into())
            .await
            .map_err(Error::nats)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_per_account_and_case_insensitive() {
        assert_eq!(
            key("ns/app", "A@Example.test"),
            key("ns/app", "a@example.test")
        );
        assert_ne!(
            key("ns/app", "a@example.test"),
            key("ns/other", "a@example.test")
        );
        assert!(key("ns/app.v1", "x@y").starts_with("ns_app_v1."));
    }
}
