//! The suppression list: per account, recipients that hard-bounced. Delivery adds them and
//! skips them; ingress refuses them at RCPT; the API lists them and takes them off (an
//! address that was fixed). Kept in NATS KV; entries expire after `delivery.suppression_ttl`.
//!
//! Key: `<account>.<digest of the address>` (addresses hold characters keys do not allow),
//! so one account's entries are one subject filter. Value: JSON [`Suppressed`], which keeps
//! the address itself for listing.

use std::{ops::ControlFlow, time::Duration};

use async_nats::jetstream::{self, consumer::DeliverPolicy, kv, stream::StorageType};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Error, scan};

pub const SUPPRESSION_BUCKET: &str = "HERALD_SUPPRESSION";

/// Header the KV layer marks deletes and purges with.
const KV_OPERATION: &str = "KV-Operation";

#[derive(Clone)]
pub struct Suppression {
    store: kv::Store,
}

/// One suppressed address of an account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suppressed {
    /// The recipient as it bounced (empty for entries written before addresses were kept).
    pub address: String,
    /// The remote server's reply that put it here.
    pub reason: String,
    /// Unix seconds when it was added.
    pub at: i64,
}

impl Suppressed {
    /// Reads a stored value; early values were the bare reason text.
    fn decode(value: &[u8]) -> Suppressed {
        serde_json::from_slice(value).unwrap_or_else(|_| Suppressed {
            address: String::new(),
            reason: String::from_utf8_lossy(value).into_owned(),
            at: 0,
        })
    }
}

/// The account part of a key: the characters KV keys and subject tokens do not allow.
fn account_key(account: &str) -> String {
    account.replace(['/', '.', ' ', '*', '>', ':'], "_")
}

/// Key of one (account, recipient): addresses hold characters KV keys do not allow.
fn key(account: &str, recipient: &str) -> String {
    let digest = Sha256::digest(recipient.to_lowercase().as_bytes());
    format!("{}.{}", account_key(account), hex::encode(&digest[..16]))
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
            .map(|v| Suppressed::decode(&v).reason))
    }

    pub async fn add(&self, account: &str, recipient: &str, reason: &str) -> Result<(), Error> {
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or_default();
        let value = serde_json::to_vec(&Suppressed {
            address: recipient.to_string(),
            reason: reason.to_string(),
            at,
        })
        .map_err(Error::nats)?;
        self.store
            .put(key(account, recipient), value.into())
            .await
            .map_err(Error::nats)?;
        Ok(())
    }

    /// Every address suppressed for `account`, oldest first, reading at most `limit`
    /// entries; the flag is false when there were more.
    pub async fn list(
        &self,
        account: &str,
        limit: usize,
    ) -> Result<(Vec<Suppressed>, bool), Error> {
        let filter = format!("{}{}.*", self.store.prefix, account_key(account));
        let mut out = Vec::new();
        let outcome = scan::scan(
            &self.store.stream,
            &filter,
            DeliverPolicy::LastPerSubject,
            limit,
            |m| {
                // The last message of a removed key is its delete marker.
                let removed = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(KV_OPERATION))
                    .is_some_and(|op| op.as_str() != "PUT");
                if !removed {
                    out.push(Suppressed::decode(&m.payload));
                }
                ControlFlow::Continue(())
            },
        )
        .await?;
        out.sort_by_key(|s| s.at);
        Ok((out, outcome.complete))
    }

    /// Takes `recipient` off `account`'s list, so mail to it is accepted again; false when
    /// it was not on it.
    pub async fn remove(&self, account: &str, recipient: &str) -> Result<bool, Error> {
        let key = key(account, recipient);
        if self.store.get(&key).await.map_err(Error::nats)?.is_none() {
            return Ok(false);
        }
        self.store.delete(&key).await.map_err(Error::nats)?;
        Ok(true)
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

    #[test]
    fn values_keep_the_address_and_read_old_bare_reasons() {
        let v = serde_json::to_vec(&Suppressed {
            address: "A@example.test".into(),
            reason: "550 5.1.1 no such user".into(),
            at: 7,
        })
        .expect("json");
        let s = Suppressed::decode(&v);
        assert_eq!(s.address, "A@example.test");
        assert_eq!(s.reason, "550 5.1.1 no such user");
        let old = Suppressed::decode(b"550 5.1.1 gone");
        assert_eq!(
            (old.address.as_str(), old.reason.as_str()),
            ("", "550 5.1.1 gone")
        );
    }
}
