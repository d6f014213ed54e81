//! Where to deliver a domain's mail: its MX hosts by preference (RFC 5321 5.1), the domain's
//! own address when it has no MX, or the configured relay host. DNS goes only to the
//! configured nameservers.

use std::net::{IpAddr, SocketAddr};

use herald_core::config::DnsConfig;
use hickory_resolver::{TokioResolver, proto::rr::RData};

/// One host to try, with its addresses in the order to try them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    /// Host name (for TLS SNI and logs), or the relay's address.
    pub name: String,
    pub addrs: Vec<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The domain does not exist: permanent.
    #[error("recipient domain {0} does not exist")]
    NoSuchDomain(String),
    /// RFC 7505 null MX: the domain accepts no mail.
    #[error("recipient domain {0} does not accept mail (null MX)")]
    NullMx(String),
    /// DNS trouble or no usable address yet: temporary.
    #[error("DNS lookup for {domain} failed: {reason}")]
    Temporary { domain: String, reason: String },
}

impl RouteError {
    pub fn is_permanent(&self) -> bool {
        matches!(self, RouteError::NoSuchDomain(_) | RouteError::NullMx(_))
    }
}

/// Builds a resolver that asks exactly `cfg.nameservers`, caching answers for their TTL.
pub fn resolver(cfg: &DnsConfig) -> Result<TokioResolver, String> {
    herald_core::dns::resolver(&cfg.nameservers, cfg.timeout, herald_core::dns::Cache::Ttl)
}

/// Resolves the hops for `domain`, most preferred first; hosts of equal preference are
/// shuffled to spread load (RFC 5321 5.1).
pub async fn resolve(
    resolver: &TokioResolver,
    domain: &str,
    port: u16,
) -> Result<Vec<Hop>, RouteError> {
    let fqdn = format!("{}.", domain.trim_end_matches('.'));
    let temporary = |reason: String| RouteError::Temporary {
        domain: domain.to_string(),
        reason,
    };
    let mut exchanges: Vec<(u16, String)> = match resolver.mx_lookup(fqdn.as_str()).await {
        Ok(lookup) => lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::MX(mx) => Some((mx.preference, mx.exchange.to_ascii())),
                _ => None,
            })
            .collect(),
        Err(e) if e.is_nx_domain() => return Err(RouteError::NoSuchDomain(domain.to_string())),
        Err(e) if e.is_no_records_found() => Vec::new(),
        Err(e) => return Err(temporary(e.to_string())),
    };
    if exchanges.len() == 1 && exchanges[0].1 == "." {
        return Err(RouteError::NullMx(domain.to_string()));
    }
    exchanges.retain(|(_, host)| host != ".");
    if exchanges.is_empty() {
        // RFC 5321 5.1: no MX means the domain itself is the host.
        exchanges.push((0, fqdn.clone()));
    }
    {
        use rand::seq::SliceRandom;
        exchanges.shuffle(&mut rand::rng());
    }
    exchanges.sort_by_key(|(pref, _)| *pref);

    let mut hops = Vec::new();
    let mut last_error = None;
    for (_, host) in exchanges {
        match resolver.lookup_ip(host.as_str()).await {
            Ok(ips) => {
                let addrs: Vec<SocketAddr> = ips
                    .iter()
                    .filter(usable)
                    .map(|ip| SocketAddr::new(ip, port))
                    .collect();
                if !addrs.is_empty() {
                    hops.push(Hop {
                        name: host.trim_end_matches('.').to_string(),
                        addrs,
                    });
                }
            }
            Err(e) => last_error = Some(format!("{host}: {e}")),
        }
    }
    if hops.is_empty() {
        return Err(temporary(
            last_error.unwrap_or_else(|| "no MX host has a usable address".into()),
        ));
    }
    Ok(hops)
}

/// Addresses an MX may never point us at: unspecified and multicast.
fn usable(ip: &IpAddr) -> bool {
    !ip.is_unspecified() && !ip.is_multicast()
}
