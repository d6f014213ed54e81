//! SASL PLAIN (RFC 4616) and LOGIN decoding. Verification itself is in
//! [`herald_core::password`], in constant time.

use base64::{Engine, engine::general_purpose::STANDARD};

/// Username and password offered by the client.
pub struct Credentials {
    pub username: String,
    pub password: String,
}

/// Decodes a PLAIN response: `authzid NUL authcid NUL passwd`. An authorization identity
/// other than the authentication identity is refused (no impersonation).
pub fn decode_plain(b64: &str) -> Option<Credentials> {
    let raw = STANDARD.decode(b64.trim()).ok()?;
    let mut parts = raw.split(|&b| b == 0);
    let authz = parts.next()?;
    let user = parts.next()?;
    let pass = parts.next()?;
    if parts.next().is_some() {
        return None;
    }
    let username = String::from_utf8(user.to_vec()).ok()?;
    if !authz.is_empty() && authz != user {
        return None;
    }
    Some(Credentials {
        username,
        password: String::from_utf8(pass.to_vec()).ok()?,
    })
}

/// Decodes one base64 line of the LOGIN exchange.
pub fn decode_line(b64: &str) -> Option<String> {
    String::from_utf8(STANDARD.decode(b64.trim()).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_splits_identity_and_password() {
        let c = decode_plain(&STANDARD.encode(b"\0app\0s3cret")).expect("valid");
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("app", "s3cret")
        );
        let c = decode_plain(&STANDARD.encode(b"app\0app\0pw")).expect("same authz");
        assert_eq!(c.username, "app");
    }

    #[test]
    fn plain_refuses_impersonation_and_garbage() {
        assert!(decode_plain(&STANDARD.encode(b"admin\0app\0pw")).is_none());
        assert!(decode_plain(&STANDARD.encode(b"app\0pw")).is_none());
        assert!(decode_plain("!!!").is_none());
    }
}
