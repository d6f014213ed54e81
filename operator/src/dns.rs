//! DNS lookups for verification, through hickory on explicit nameservers only: the system
//! resolver (`/etc/resolv.conf`) is never read, because it may point anywhere and a check
//! must ask the servers the operator was configured with.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use futures::future::BoxFuture;
use hickory_resolver::{
    TokioResolver,
    proto::rr::{RData, RecordType},
};

/// Why a lookup has no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// NXDOMAIN or no record of the type: nothing is published.
    #[error("no {0} record")]
    NotFound(&'static str),
    /// The question could not be answered (timeout, SERVFAIL, REFUSED, unreachable server):
    /// says nothing about what is published.
    #[error("{0}")]
    Failed(String),
}

/// The lookups verification needs. Names are fully qualified, without the trailing dot.
/// A trait so the reconciler's API-call scenarios run without any DNS server; the hickory
/// implementation is tested against a real dnsmasq.
pub trait Lookup: Send + Sync {
    /// Every TXT record at `name`, each one's character-strings concatenated (RFC 7208 3.3,
    /// RFC 6376 3.6.2.2).
    fn txt<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Vec<String>, LookupError>>;
    /// The CNAME target of `name` (no trailing dot, lower case).
    fn cname<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Vec<String>, LookupError>>;
    /// The MX exchanges of `name` (no trailing dot, lower case).
    fn mx<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Vec<String>, LookupError>>;
    /// The PTR names of `ip` (no trailing dot, lower case).
    fn ptr(&self, ip: IpAddr) -> BoxFuture<'_, Result<Vec<String>, LookupError>>;
    /// The A and AAAA addresses of `name`.
    fn addrs<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Vec<IpAddr>, LookupError>>;
}

/// The reverse-lookup name of `ip`: `d.c.b.a.in-addr.arpa` or the nibbles under `ip6.arpa`.
pub fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut labels: Vec<String> = Vec::with_capacity(34);
            for byte in v6.octets().iter().rev() {
                labels.push(format!("{:x}", byte & 0x0f));
                labels.push(format!("{:x}", byte >> 4));
            }
            labels.push("ip6.arpa".into());
            labels.join(".")
        }
    }
}

/// Hickory resolver asking exactly the given nameservers, without a cache: each check must
/// see what DNS answers now, not what it answered up to a TTL ago.
pub struct HickoryLookup {
    resolver: TokioResolver,
}

impl HickoryLookup {
    pub fn new(nameservers: &[SocketAddr], timeout: Duration) -> Result<HickoryLookup, String> {
        let resolver =
            herald_core::dns::resolver(nameservers, timeout, herald_core::dns::Cache::Off)?;
        Ok(HickoryLookup { resolver })
    }

    async fn lookup(
        &self,
        name: &str,
        rtype: RecordType,
        label: &'static str,
    ) -> Result<Vec<RData>, LookupError> {
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        match self.resolver.lookup(fqdn.as_str(), rtype).await {
            Ok(lookup) => {
                let data: Vec<RData> = lookup
                    .answers()
                    .iter()
                    .filter(|r| r.record_type() == rtype)
                    .map(|r| r.data.clone())
                    .collect();
                if data.is_empty() {
                    Err(LookupError::NotFound(label))
                } else {
                    Ok(data)
                }
            }
            Err(e) if e.is_nx_domain() || e.is_no_records_found() => {
                Err(LookupError::NotFound(label))
            }
            Err(e) => Err(LookupError::Failed(e.to_string())),
        }
    }
}

fn host(name: &hickory_resolver::proto::rr::Name) -> String {
    name.to_ascii().trim_end_matches('.').to_ascii_lowercase()
}

impl Lookup for HickoryLookup {
    fn txt<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Vec<String>, LookupError>> {
        Box::pin(async move {
            let data = self.lookup(name, RecordType::TXT, "TXT").await?;
            Ok(data
                .into_iter()
                .filter_map(|d| match d {
                    RData::TXT(txt) => Some(
                        txt.txt_data
                            .iter()
                            .map(|s| String::from_utf8_lossy(s).into_owned())
                            .collect::<String>(),
                    ),
                    _ => None,
                })
                .collect())
        })
    }

    fn cname<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Vec<String>, LookupError>> {
        Box::pin(async move {
            let data = self.lookup(name, RecordType::CNAME, "CNAME").await?;
            Ok(data
                .into_iter()
                .filter_map(|d| match d {
                    RData::CNAME(c) => Some(host(&c.0)),
                    _ => None,
                })
                .collect())
        })
    }

    fn mx<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Vec<String>, LookupError>> {
        Box::pin(async move {
            let data = self.lookup(name, RecordType::MX, "MX").await?;
            Ok(data
                .into_iter()
                .filter_map(|d| match d {
                    RData::MX(mx) => Some(host(&mx.exchange)),
                    _ => None,
                })
                .collect())
        })
    }

    fn ptr(&self, ip: IpAddr) -> BoxFuture<'_, Result<Vec<String>, LookupError>> {
        Box::pin(async move {
            let data = self
                .lookup(&reverse_name(ip), RecordType::PTR, "PTR")
                .await?;
            Ok(data
                .into_iter()
                .filter_map(|d| match d {
                    RData::PTR(p) => Some(host(&p.0)),
                    _ => None,
                })
                .collect())
        })
    }

    fn addrs<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Vec<IpAddr>, LookupError>> {
        Box::pin(async move {
            let mut out = Vec::new();
            let mut failure = None;
            for (rtype, label) in [(RecordType::A, "A"), (RecordType::AAAA, "AAAA")] {
                match self.lookup(name, rtype, label).await {
                    Ok(data) => out.extend(data.into_iter().filter_map(|d| match d {
                        RData::A(a) => Some(IpAddr::V4(a.0)),
                        RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                        _ => None,
                    })),
                    Err(LookupError::NotFound(_)) => {}
                    Err(e) => failure = Some(e),
                }
            }
            match (out.is_empty(), failure) {
                (false, _) => Ok(out),
                (true, Some(e)) => Err(e),
                (true, None) => Err(LookupError::NotFound("A/AAAA")),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reverse_names_follow_rfc_1035_and_3596() {
        assert_eq!(
            reverse_name("192.0.2.10".parse().expect("ip")),
            "10.2.0.192.in-addr.arpa"
        );
        let v6 = reverse_name("2001:db8::1".parse().expect("ip"));
        assert!(v6.starts_with("1.0.0.0.0.0.0.0."), "{v6}");
        assert!(v6.ends_with(".8.b.d.0.1.0.0.2.ip6.arpa"), "{v6}");
        assert_eq!(v6.split('.').count(), 34);
    }
}
