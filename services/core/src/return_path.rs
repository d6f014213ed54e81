//! What an inbound bounce needs to know about the message it returns: one small record per
//! message sent with a return path (VERP, see [`crate::verp`]), keyed by queue id in the
//! `HERALD_RETURN_PATHS` KV bucket. Ingress writes it while it queues the message and reads
//! it when a bounce for that queue id arrives. It lives as long as the message may be
//! queued plus `bounces.record_grace`, the time remote servers may take to bounce.

use std::time::Duration;

use async_nats::jetstream::{self, kv, stream::StorageType};
use serde::{Deserialize, Serialize};

use crate::Error;

pub const RETURN_PATH_BUCKET: &str = "HERALD_RETURN_PATHS";

/// The message a return-path address stands for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReturnPathRecord {
    /// SmtpAccount id (`namespace/name`): whose events and suppression list.
    pub account: String,
    /// The app's envelope sender.
    pub sender: String,
    /// MailDomain id of the sender.
    pub sender_domain: String,
    pub message_id: String,
    /// Every recipient of the message (lower-cased): a report about anyone else is ignored,
    /// so a recipient who saw the return path cannot suppress arbitrary addresses.
    pub recipients: Vec<String>,
    /// Unix seconds when the message was accepted.
    pub received_at: i64,
}

impl ReturnPathRecord {
    /// The recipient of the message that `address` names, if it is one.
    pub fn recipient(&self, address: &str) -> Option<&str> {
        self.recipients
            .iter()
            .find(|r| r.eq_ignore_ascii_case(address))
            .map(String::as_str)
    }
}

#[derive(Clone)]
pub struct ReturnPaths {
    store: kv::Store,
    timeout: Duration,
}

impl ReturnPaths {
    /// Creates (or reshapes) the bucket; `ttl` is the queue lifetime plus the grace.
    pub async fn setup(
        js: &jetstream::Context,
        replicas: usize,
        ttl: Duration,
        timeout: Duration,
    ) -> Result<ReturnPaths, Error> {
        let store = js
            .create_or_update_key_value(kv::Config {
                bucket: RETURN_PATH_BUCKET.into(),
                description: "Per queued message with a return path: account, sender, recipients"
                    .into(),
                history: 1,
                max_age: ttl,
                storage: StorageType::File,
                num_replicas: replicas.max(1),
                ..Default::default()
            })
            .await
            .map_err(|e| Error::Nats(format!("bucket {RETURN_PATH_BUCKET}: {e}")))?;
        Ok(ReturnPaths { store, timeout })
    }

    pub async fn put(&self, queue_id: &str, record: &ReturnPathRecord) -> Result<(), Error> {
        let value = serde_json::to_vec(record).map_err(Error::nats)?;
        tokio::time::timeout(self.timeout, self.store.put(queue_id, value.into()))
            .await
            .map_err(|_| Error::Nats(format!("{RETURN_PATH_BUCKET} put timed out")))?
            .map_err(Error::nats)?;
        Ok(())
    }

    /// The record of `queue_id`; `None` when there is none (never written, or expired).
    pub async fn get(&self, queue_id: &str) -> Result<Option<ReturnPathRecord>, Error> {
        let value = tokio::time::timeout(self.timeout, self.store.get(queue_id))
            .await
            .map_err(|_| Error::Nats(format!("{RETURN_PATH_BUCKET} get timed out")))?
            .map_err(Error::nats)?;
        match value {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::Envelope(format!("return-path record {queue_id}: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_recipients_of_the_message_are_found() {
        let r = ReturnPathRecord {
            account: "default/app".into(),
            sender: "app@example.test".into(),
            sender_domain: "default/example-test".into(),
            message_id: "<m@example.test>".into(),
            recipients: vec!["ghost@dest.test".into()],
            received_at: 0,
        };
        assert_eq!(r.recipient("Ghost@Dest.test"), Some("ghost@dest.test"));
        assert_eq!(r.recipient("someone@dest.test"), None);
        let json = serde_json::to_string(&r).expect("serializes");
        assert_eq!(
            serde_json::from_str::<ReturnPathRecord>(&json).expect("parses"),
            r
        );
    }
}
