//! Who may ask: one bearer token (`api.token`, or `api.token_file`), checked in constant time
//! by both front-ends. Without a token the API holds itself to loopback addresses unless
//! `api.allow_unauthenticated` says the network in front of it is trusted: the reports name
//! recipients, and a delete re-opens an address to mail.

use std::sync::Arc;

use herald_core::config::ApiConfig;
use subtle::ConstantTimeEq as _;

use crate::ApiError;

#[derive(Clone)]
pub struct Auth {
    token: Option<Arc<[u8]>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Auth {
    /// The token from the configuration, and the loopback rule checked against it.
    pub fn from_config(cfg: &ApiConfig) -> Result<Auth, ApiError> {
        let token = match (&cfg.token, &cfg.token_file) {
            (Some(t), _) => Some(t.trim().to_string()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| {
                        ApiError::Setup(format!("api.token_file {}: {e}", path.display()))
                    })?
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        };
        if token.as_deref() == Some("") {
            return Err(ApiError::Setup(
                "api.token is empty: set a token, or leave it unset".into(),
            ));
        }
        if token.is_none() && !cfg.allow_unauthenticated {
            for (key, addr) in [
                ("api.grpc_addr", cfg.grpc_addr),
                ("api.http_addr", cfg.http_addr),
            ] {
                if !addr.ip().is_loopback() {
                    return Err(ApiError::Setup(format!(
                        "{key} {addr} is not a loopback address and no api.token is set: set \
                         api.token (or api.token_file), or api.allow_unauthenticated: true if \
                         the network in front of the API does the checking"
                    )));
                }
            }
        }
        Ok(Auth {
            token: token.map(|t| Arc::from(t.into_bytes())),
        })
    }

    /// A policy with this token (tests).
    pub fn with_token(token: Option<&str>) -> Auth {
        Auth {
            token: token.map(|t| Arc::from(t.as_bytes())),
        }
    }

    pub fn required(&self) -> bool {
        self.token.is_some()
    }

    /// Checks an `Authorization` header value (`Bearer <token>`).
    pub fn check(&self, authorization: Option<&[u8]>) -> Result<(), ApiError> {
        let Some(expected) = &self.token else {
            return Ok(());
        };
        let presented = authorization
            .and_then(bearer)
            .ok_or(ApiError::Unauthenticated)?;
        if bool::from(presented.ct_eq(expected)) {
            Ok(())
        } else {
            Err(ApiError::Unauthenticated)
        }
    }
}

/// The credentials of a `Bearer` authorization (the scheme is case-insensitive).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let start = rest.iter().position(|b| *b != b' ')?;
    Some(rest[start..].trim_ascii_end())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(token: Option<&str>, addr: &str, allow: bool) -> ApiConfig {
        ApiConfig {
            token: token.map(String::from),
            http_addr: addr.parse().expect("addr"),
            allow_unauthenticated: allow,
            ..Default::default()
        }
    }

    #[test]
    fn only_the_exact_bearer_token_passes() {
        let auth = Auth::with_token(Some("s3cret-token"));
        assert!(auth.check(Some(b"Bearer s3cret-token")).is_ok());
        assert!(auth.check(Some(b"bearer s3cret-token")).is_ok());
        for bad in [
            &b""[..],
            b"Bearer",
            b"Bearer ",
            b"Bearer s3cret-toke",
            b"Bearer s3cret-token2",
            b"Basic s3cret-token",
            b"s3cret-token",
        ] {
            assert!(
                matches!(auth.check(Some(bad)), Err(ApiError::Unauthenticated)),
                "{:?} passed",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(matches!(auth.check(None), Err(ApiError::Unauthenticated)));
        assert!(Auth::with_token(None).check(None).is_ok());
    }

    #[test]
    fn without_a_token_the_api_stays_on_loopback() {
        assert!(Auth::from_config(&cfg(None, "127.0.0.1:8080", false)).is_ok());
        assert!(Auth::from_config(&cfg(None, "[::1]:8080", false)).is_ok());
        let err = Auth::from_config(&cfg(None, "0.0.0.0:8080", false)).expect_err("refused");
        assert!(err.to_string().contains("api.http_addr"), "{err}");
        assert!(Auth::from_config(&cfg(None, "0.0.0.0:8080", true)).is_ok());
        let auth = Auth::from_config(&cfg(Some("t"), "0.0.0.0:8080", false)).expect("token");
        assert!(auth.required());
        assert!(Auth::from_config(&cfg(Some(" "), "127.0.0.1:8080", false)).is_err());
    }

    #[test]
    fn the_token_can_come_from_a_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "from-file\n").expect("write");
        let mut c = cfg(None, "0.0.0.0:8080", false);
        c.token_file = Some(path);
        let auth = Auth::from_config(&c).expect("token file");
        assert!(auth.check(Some(b"Bearer from-file")).is_ok());
        c.token_file = Some(dir.path().join("missing"));
        assert!(matches!(Auth::from_config(&c), Err(ApiError::Setup(_))));
    }
}
