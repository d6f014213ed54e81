//! What an SmtpAccount may do beyond sending from its domains, and what ingress adds to
//! its mail. Part of `SmtpAccount.spec` (flattened), read by every ingress pod.

use std::net::IpAddr;

use ipnet::IpNet;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

fn default_tolerance() -> u32 {
    20
}

#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AccountPolicy {
    /// Client networks (CIDR, e.g. `10.1.2.0/24`) whose connections are this account
    /// without AUTH. Mail from them is accounted to this account and bound by its limits.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub client_networks: Vec<String>,
    /// Messages per hour across all ingress pods, counted per recipient (a message to three
    /// recipients counts three). Unset: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub hourly_limit: Option<u64>,
    /// Percent over `hourlyLimit` that is still accepted but held until the next hour
    /// starts; beyond it ingress answers `451 4.7.1`.
    #[serde(default = "default_tolerance")]
    #[schemars(range(max = 1000))]
    pub burst_tolerance_percent: u32,
    /// Headers ingress adds to this account's mail (before it is DKIM-signed).
    #[serde(default, skip_serializing_if = "SenderDefaults::is_empty")]
    pub sender_defaults: SenderDefaults,
    /// Egress pool (source IPs) this account's mail leaves from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_pool: Option<String>,
    /// Send all of this account's mail through an upstream relay (wins over the
    /// MailDomain's route).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smarthost: Option<crate::route::SmarthostRoute>,
}

impl Default for AccountPolicy {
    fn default() -> Self {
        AccountPolicy {
            client_networks: Vec::new(),
            hourly_limit: None,
            burst_tolerance_percent: default_tolerance(),
            sender_defaults: SenderDefaults::default(),
            egress_pool: None,
            smarthost: None,
        }
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SenderDefaults {
    /// `Reply-To` added when the message has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// Address for read receipts: adds `Disposition-Notification-To` (RFC 8098).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_receipt_to: Option<String>,
    /// Name of the header that identifies the account for abuse handling
    /// (default `X-Herald-Account`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identification_header: Option<String>,
    /// One-click unsubscribe (RFC 8058): an `https://` URL template; `{queue_id}` and
    /// `{account}` are replaced. Adds `List-Unsubscribe` and `List-Unsubscribe-Post` when
    /// the message has no `List-Unsubscribe` of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unsubscribe_url: Option<String>,
    /// Leave the client's IP address out of the `Received` header.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hide_client_ip: bool,
    /// Footer appended to every text/plain and text/html body part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub footer: Option<Footer>,
}

/// A footer (signature) for an account's messages.
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Footer {
    /// Appended to text/plain parts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Inserted before `</body>` of text/html parts (default: the text footer, escaped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
}

impl SenderDefaults {
    pub fn is_empty(&self) -> bool {
        self == &SenderDefaults::default()
    }

    pub fn identification_header(&self) -> &str {
        self.identification_header
            .as_deref()
            .unwrap_or("X-Herald-Account")
    }
}

impl AccountPolicy {
    /// The client networks, parsed; an invalid entry is an error naming it.
    pub fn networks(&self) -> Result<Vec<IpNet>, String> {
        self.client_networks
            .iter()
            .map(|n| {
                n.parse::<IpNet>()
                    .or_else(|_| n.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("clientNetworks: {n:?} is not a CIDR network"))
            })
            .collect()
    }

    /// The most messages per hour accepted at all (limit plus tolerance).
    pub fn hourly_ceiling(&self) -> Option<u64> {
        self.hourly_limit
            .map(|l| l + l * u64::from(self.burst_tolerance_percent) / 100)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_adds_the_tolerance() {
        let p = AccountPolicy {
            hourly_limit: Some(10),
            ..Default::default()
        };
        assert_eq!(p.hourly_ceiling(), Some(12));
        assert_eq!(AccountPolicy::default().hourly_ceiling(), None);
    }

    #[test]
    fn networks_parse_cidrs_and_single_addresses() {
        let p = AccountPolicy {
            client_networks: vec!["10.0.0.0/8".into(), "192.0.2.7".into()],
            ..Default::default()
        };
        let n = p.networks().expect("valid");
        assert!(n[0].contains(&"10.1.2.3".parse::<IpAddr>().expect("ip")));
        assert!(n[1].contains(&"192.0.2.7".parse::<IpAddr>().expect("ip")));
        let bad = AccountPolicy {
            client_networks: vec!["10.0.0.0/33".into()],
            ..Default::default()
        };
        assert!(bad.networks().is_err());
    }
}
