//! The account a report is about, as events and the suppression list name it.

use std::fmt;

use crate::ApiError;

/// An SmtpAccount: `namespace/name` (files mode: the document's namespace, else `default`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountId {
    namespace: String,
    name: String,
}

/// Kubernetes object names are at most 253 characters of `[a-z0-9.-]`; files-mode names
/// follow the same YAML. Anything else cannot be an account, and a `*` or `>` would widen
/// the subject filter a report reads with.
fn valid_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

impl AccountId {
    pub fn new(namespace: &str, name: &str) -> Result<AccountId, ApiError> {
        for (what, part) in [("namespace", namespace), ("name", name)] {
            if !valid_part(part) {
                return Err(ApiError::BadRequest(format!(
                    "account {what} {part:?} is not a Kubernetes object name"
                )));
            }
        }
        Ok(AccountId {
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
    }

    /// `namespace/name`, as gRPC requests carry it.
    pub fn parse(s: &str) -> Result<AccountId, ApiError> {
        let (namespace, name) = s
            .split_once('/')
            .ok_or_else(|| ApiError::BadRequest(format!("account {s:?} is not namespace/name")))?;
        AccountId::new(namespace, name)
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_are_namespace_and_name() {
        let a = AccountId::parse("mail/app").expect("valid");
        assert_eq!(a.to_string(), "mail/app");
        assert_eq!(
            AccountId::new("mail", "app.v2").expect("valid").to_string(),
            "mail/app.v2"
        );
    }

    #[test]
    fn wildcards_and_malformed_accounts_are_bad_requests() {
        for bad in [
            "app", "/app", "mail/", "mail/*", "mail/>", "a/b/c", "mail/a b",
        ] {
            assert!(
                matches!(AccountId::parse(bad), Err(ApiError::BadRequest(_))),
                "{bad} accepted"
            );
        }
    }
}
