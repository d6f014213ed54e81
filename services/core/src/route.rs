//! Smarthost routes: a MailDomain or an SmtpAccount may send everything through an upstream
//! relay instead of the recipients' MX hosts.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How the connection to the upstream is protected.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RouteTls {
    /// Plain TCP (only on trusted networks).
    None,
    /// STARTTLS, required: without it nothing is sent.
    #[default]
    Starttls,
    /// TLS from the first byte (port 465).
    Implicit,
}

/// An upstream relay (smarthost).
#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SmarthostRoute {
    /// Host name or IP address of the upstream.
    #[schemars(length(min = 1, max = 253))]
    pub host: String,
    /// Port (587 with STARTTLS, 465 with implicit TLS, 25 between MTAs).
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default)]
    pub tls: RouteTls,
    /// Secret (same namespace) with `username` and `password` for AUTH. Label it
    /// `herald.dev/maildomain: <name>` or `herald.dev/smtpaccount: <name>` like the other
    /// Secrets Herald reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
    /// Accept any certificate from the upstream (self-signed relays). Off by default: the
    /// certificate must chain to the system's trusted roots and match `host`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub trust_any_certificate: bool,
}

fn default_port() -> u16 {
    587
}

/// A route as delivery uses it, with its credentials read from the Secret.
#[derive(Clone, PartialEq)]
pub struct ResolvedRoute {
    pub host: String,
    pub port: u16,
    pub tls: RouteTls,
    pub trust_any_certificate: bool,
    /// `Some` when the route names a credentials Secret: `Err` says what is missing.
    pub credentials: Option<Result<(String, String), String>>,
}

impl std::fmt::Debug for ResolvedRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResolvedRoute")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("trust_any_certificate", &self.trust_any_certificate)
            .field("credentials", &self.credentials.as_ref().map(|c| c.is_ok()))
            .finish()
    }
}

impl SmarthostRoute {
    /// Resolves the credentials Secret through `secret` (namespace-local lookup).
    pub fn resolve<'a>(
        &self,
        secret: impl Fn(&str) -> Option<&'a std::collections::BTreeMap<String, String>>,
    ) -> ResolvedRoute {
        let credentials = self.credentials_secret.as_ref().map(|name| {
            let data = secret(name)
                .ok_or_else(|| format!("smarthost credentials Secret {name} not found"))?;
            let get = |k: &str| {
                data.get(k)
                    .map(|v| v.trim_end_matches(['\r', '\n']).to_string())
                    .ok_or_else(|| format!("smarthost credentials Secret {name} has no {k}"))
            };
            Ok((get("username")?, get("password")?))
        });
        ResolvedRoute {
            host: self.host.clone(),
            port: self.port,
            tls: self.tls,
            trust_any_certificate: self.trust_any_certificate,
            credentials,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn credentials_come_from_the_secret_or_say_what_is_missing() {
        let route: SmarthostRoute =
            serde_yaml::from_str("{host: relay.test, credentialsSecret: relay-auth}")
                .expect("route");
        assert_eq!((route.port, route.tls), (587, RouteTls::Starttls));
        let data = BTreeMap::from([
            ("username".to_string(), "u".to_string()),
            ("password".to_string(), "p\n".to_string()),
        ]);
        let ok = route.resolve(|n| (n == "relay-auth").then_some(&data));
        assert_eq!(ok.credentials, Some(Ok(("u".into(), "p".into()))));
        let missing = route.resolve(|_| None);
        assert_eq!(
            missing.credentials,
            Some(Err(
                "smarthost credentials Secret relay-auth not found".into()
            ))
        );
    }
}
