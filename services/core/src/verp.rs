//! Return-path addresses (VERP, one per message): `b+<queue id>-<tag>@<return-path host>`.
//!
//! Delivery sends them as MAIL FROM when the sender's MailDomain has `spec.returnPath`, so
//! that asynchronous bounces come back to Herald's inbound listener, which decodes them to
//! the message they are about. The tag is the first [`TAG_LEN`] hex digits of
//! HMAC-SHA256(`bounces.secret`, queue id): a bounce can suppress addresses, so only whoever
//! saw a message may bounce it. Without a secret there is no tag (`b+<queue id>@<host>`).
//!
//! Local parts are treated case-insensitively (some MTAs change their case): the queue id
//! (a ULID) is read in any case and the tag compared in lower case.

use aws_lc_rs::hmac;
use subtle::ConstantTimeEq;

use crate::types::{Domain, QueueId};

/// Every return-path local part starts with this.
pub const PREFIX: &str = "b+";
/// Hex digits of the HMAC kept in the tag: 40 bits, beyond guessing at SMTP speed.
pub const TAG_LEN: usize = 10;

/// Why a local part is not a return-path address Herald made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerpError {
    #[error("not a return-path address")]
    NotVerp,
    #[error("no valid queue id in the return-path address")]
    BadQueueId,
    #[error("return-path address has no tag")]
    MissingTag,
    #[error("return-path tag does not verify")]
    BadTag,
}

/// Encodes and decodes return-path addresses with the configured secret.
#[derive(Clone)]
pub struct Verp {
    key: Option<hmac::Key>,
}

impl Verp {
    /// `secret` is `bounces.secret`; `None` makes untagged addresses.
    pub fn new(secret: Option<&str>) -> Verp {
        Verp {
            key: secret.map(|s| hmac::Key::new(hmac::HMAC_SHA256, s.as_bytes())),
        }
    }

    pub fn is_tagged(&self) -> bool {
        self.key.is_some()
    }

    fn tag(&self, key: &hmac::Key, queue_id: &str) -> String {
        let full = hex::encode(hmac::sign(key, queue_id.as_bytes()).as_ref());
        full[..TAG_LEN].to_string()
    }

    /// The local part for `queue_id`.
    pub fn local_part(&self, queue_id: &str) -> String {
        match &self.key {
            Some(key) => format!("{PREFIX}{queue_id}-{}", self.tag(key, queue_id)),
            None => format!("{PREFIX}{queue_id}"),
        }
    }

    /// The whole return-path address for `queue_id` under `host`.
    pub fn address(&self, queue_id: &str, host: &Domain) -> String {
        format!("{}@{host}", self.local_part(queue_id))
    }

    /// The queue id a return-path local part names, once its tag verifies. With no secret
    /// configured a tag is not required, and one that is present cannot be checked (it was
    /// made while a secret was set): it is ignored.
    pub fn decode(&self, local: &str) -> Result<QueueId, VerpError> {
        let rest = local
            .get(..PREFIX.len())
            .filter(|p| p.eq_ignore_ascii_case(PREFIX))
            .and_then(|_| local.get(PREFIX.len()..))
            .ok_or(VerpError::NotVerp)?;
        let (id, tag) = match rest.split_once('-') {
            Some((id, tag)) => (id, Some(tag)),
            None => (rest, None),
        };
        let id = ulid::Ulid::from_string(id)
            .map_err(|_| VerpError::BadQueueId)?
            .to_string();
        if let Some(key) = &self.key {
            let tag = tag.ok_or(VerpError::MissingTag)?.to_ascii_lowercase();
            let expected = self.tag(key, &id);
            if !bool::from(tag.as_bytes().ct_eq(expected.as_bytes())) {
                return Err(VerpError::BadTag);
            }
        }
        Ok(QueueId::from_string(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "01JD5Z8Q4R6N3V2W1X0Y9Z8A7B";

    fn host() -> Domain {
        Domain::parse("bounces.example.test").expect("domain")
    }

    #[test]
    fn tagged_address_round_trips() {
        let verp = Verp::new(Some("a secret of some length"));
        let address = verp.address(ID, &host());
        let (local, domain) = address.rsplit_once('@').expect("an address");
        assert_eq!(domain, "bounces.example.test");
        assert!(
            local.starts_with("b+01JD5Z8Q4R6N3V2W1X0Y9Z8A7B-"),
            "{local}"
        );
        assert_eq!(local.len(), PREFIX.len() + 26 + 1 + TAG_LEN);
        assert!(local.len() <= 64, "fits the RFC 5321 local-part limit");
        assert_eq!(
            verp.decode(local).map(|q| q.to_string()),
            Ok(ID.to_string())
        );
    }

    #[test]
    fn case_changes_on_the_way_back_are_tolerated() {
        let verp = Verp::new(Some("a secret of some length"));
        let local = verp.local_part(ID);
        assert_eq!(
            verp.decode(&local.to_lowercase()).map(|q| q.to_string()),
            Ok(ID.to_string())
        );
        assert_eq!(
            verp.decode(&local.to_uppercase()).map(|q| q.to_string()),
            Ok(ID.to_string())
        );
    }

    #[test]
    fn forged_or_foreign_tags_are_refused() {
        let verp = Verp::new(Some("a secret of some length"));
        let other = Verp::new(Some("another secret, also long"));
        let local = other.local_part(ID);
        assert_eq!(verp.decode(&local), Err(VerpError::BadTag));
        assert_eq!(
            verp.decode(&format!("b+{ID}-0000000000")),
            Err(VerpError::BadTag)
        );
        assert_eq!(verp.decode(&format!("b+{ID}")), Err(VerpError::MissingTag));
        // A tag for one queue id does not fit another.
        let second = "01JD5Z8Q4R6N3V2W1X0Y9Z8A7C";
        let tag = verp
            .local_part(ID)
            .rsplit_once('-')
            .map(|(_, t)| t.to_string());
        let swapped = format!("b+{second}-{}", tag.expect("tag"));
        assert_eq!(verp.decode(&swapped), Err(VerpError::BadTag));
    }

    #[test]
    fn other_local_parts_are_not_verp() {
        let verp = Verp::new(Some("a secret of some length"));
        assert_eq!(verp.decode("postmaster"), Err(VerpError::NotVerp));
        assert_eq!(verp.decode("b"), Err(VerpError::NotVerp));
        assert_eq!(verp.decode("b+not-a-ulid"), Err(VerpError::BadQueueId));
        assert_eq!(verp.decode("b+"), Err(VerpError::BadQueueId));
        assert_eq!(verp.decode("b+ü"), Err(VerpError::BadQueueId));
    }

    #[test]
    fn without_a_secret_there_is_no_tag() {
        let verp = Verp::new(None);
        assert!(!verp.is_tagged());
        assert_eq!(verp.local_part(ID), format!("b+{ID}"));
        assert_eq!(
            verp.decode(&format!("b+{ID}")).map(|q| q.to_string()),
            Ok(ID.to_string())
        );
        // Made while a secret was set: cannot be checked, the queue id still counts.
        let tagged = Verp::new(Some("a secret of some length")).local_part(ID);
        assert_eq!(
            verp.decode(&tagged).map(|q| q.to_string()),
            Ok(ID.to_string())
        );
    }
}
