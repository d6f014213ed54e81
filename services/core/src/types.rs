//! Small types that carry invariants instead of bare strings.

use std::fmt;

/// A DNS domain as used in mail: lower-case, no trailing dot, syntactically valid labels.
/// Internationalised names are kept as given (UTF-8); MX lookups convert them.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Domain(String);

impl Domain {
    pub fn parse(s: &str) -> Option<Domain> {
        let d = s.trim_end_matches('.').to_lowercase();
        if d.is_empty() || d.len() > 253 {
            return None;
        }
        let ok = d.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .chars()
                    .all(|c| c.is_alphanumeric() || c == '-' || !c.is_ascii())
        });
        ok.then_some(Domain(d))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An address `local@domain` from an SMTP envelope.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Mailbox {
    local: String,
    domain: Domain,
}

impl Mailbox {
    pub fn parse(s: &str) -> Option<Mailbox> {
        let (local, domain) = s.rsplit_once('@')?;
        if local.is_empty() || local.len() > 64 {
            return None;
        }
        Some(Mailbox {
            local: local.to_string(),
            domain: Domain::parse(domain)?,
        })
    }

    pub fn local(&self) -> &str {
        &self.local
    }

    pub fn domain(&self) -> &Domain {
        &self.domain
    }

    /// True when the address needs SMTPUTF8 to be transmitted.
    pub fn is_utf8(&self) -> bool {
        !self.local.is_ascii() || !self.domain.as_str().is_ascii()
    }
}

impl fmt::Display for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

/// Identifies one accepted message across ingress, queue, delivery and events.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct QueueId(String);

impl QueueId {
    pub fn generate() -> QueueId {
        QueueId(ulid::Ulid::new().to_string())
    }

    pub fn from_string(s: String) -> QueueId {
        QueueId(s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_is_lower_cased_and_validated() {
        assert_eq!(
            Domain::parse("Example.TEST.").map(|d| d.to_string()),
            Some("example.test".into())
        );
        assert!(Domain::parse("-bad.test").is_none());
        assert!(Domain::parse("a..b").is_none());
        assert!(Domain::parse("").is_none());
        assert!(Domain::parse("bad domain.test").is_none());
    }

    #[test]
    fn mailbox_splits_at_last_at_sign() {
        let m = Mailbox::parse("\"a@b\"@Example.test").expect("valid");
        assert_eq!(m.local(), "\"a@b\"");
        assert_eq!(m.domain().as_str(), "example.test");
        assert!(Mailbox::parse("nodomain").is_none());
        assert!(Mailbox::parse("@example.test").is_none());
        assert!(Mailbox::parse("josé@exemplo.test").expect("utf8").is_utf8());
    }
}
