//! The one way Herald builds a DNS resolver: hickory asking exactly the configured
//! nameservers (UDP, then TCP when a reply is truncated). The system resolver
//! (`/etc/resolv.conf`) is never read.

use std::{net::SocketAddr, time::Duration};

use hickory_resolver::{
    TokioResolver,
    config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts},
    net::runtime::TokioRuntimeProvider,
};

/// Whether answers are cached for their TTL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cache {
    /// Delivery: MX and address lookups repeat for every message to a domain.
    Ttl,
    /// Verification: every check must see what DNS answers now.
    Off,
}

pub fn resolver(
    nameservers: &[SocketAddr],
    timeout: Duration,
    cache: Cache,
) -> Result<TokioResolver, String> {
    if nameservers.is_empty() {
        return Err("no DNS nameserver configured".into());
    }
    let servers = nameservers
        .iter()
        .map(|addr| {
            let mut udp = ConnectionConfig::udp();
            udp.port = addr.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = addr.port();
            NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
        })
        .collect();
    let mut opts = ResolverOpts::default();
    opts.timeout = timeout;
    opts.attempts = 2;
    // Names are always fully qualified: no search list, no ndots guessing.
    opts.ndots = 0;
    if cache == Cache::Off {
        opts.cache_size = 0;
    }
    TokioResolver::builder_with_config(
        ResolverConfig::from_parts(None, vec![], servers),
        TokioRuntimeProvider::default(),
    )
    .with_options(opts)
    .build()
    .map_err(|e| e.to_string())
}
