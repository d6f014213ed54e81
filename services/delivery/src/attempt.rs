//! One delivery attempt of one queue entry: sign, find the hosts, try them in order, and
//! say for each recipient whether it was delivered, deferred or failed.

use std::{net::SocketAddr, sync::Arc};

use herald_core::{
    config::Config,
    envelope::QueueEntry,
    resources::ResourceSource,
    route::{ResolvedRoute, RouteTls},
    tls,
};
use hickory_resolver::TokioResolver;
use tokio_rustls::TlsConnector;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    client::{ClientError, Connection, RemoteReply},
    dkim::{Signer, sign_all},
    route::{self, Hop},
};

/// What happened to one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered(RemoteReply),
    /// Try again later; the text says why.
    Deferred(String),
    /// Never deliverable; the text says why (a remote 5xx reply or a local permanent error).
    Failed(String),
}

/// The result of an attempt: one outcome per recipient, in the entry's order.
#[derive(Debug)]
pub struct Attempt {
    pub outcomes: Vec<(String, Outcome)>,
    /// Host that gave the final answer, when one did.
    pub remote_host: String,
    pub tls: bool,
}

/// Records what a host said on the current `smtp.client` span.
fn record_reply(reply: &RemoteReply) {
    tracing::Span::current().record("herald.smtp.reply_code", reply.code);
}

impl Attempt {
    /// Every recipient of `entry` with the same outcome.
    pub fn all(entry: &QueueEntry, outcome: Outcome) -> Attempt {
        Attempt {
            outcomes: entry
                .recipients
                .iter()
                .map(|r| (r.address.clone(), outcome.clone()))
                .collect(),
            remote_host: String::new(),
            tls: false,
        }
    }
}

fn outcome_for(reply: &RemoteReply) -> Outcome {
    if reply.is_positive() {
        Outcome::Delivered(reply.clone())
    } else if reply.is_transient() {
        Outcome::Deferred(reply.to_string())
    } else {
        Outcome::Failed(reply.to_string())
    }
}

/// Everything an attempt needs, shared by all attempts of a worker.
pub struct Deliverer {
    config: Arc<Config>,
    resources: Arc<dyn ResourceSource>,
    resolver: TokioResolver,
    tls: TlsConnector,
    /// Verifying connector for smarthosts, built on first use from the system's roots.
    verified_tls: std::sync::OnceLock<Result<TlsConnector, String>>,
}

impl Deliverer {
    pub fn new(
        config: Arc<Config>,
        resources: Arc<dyn ResourceSource>,
    ) -> Result<Deliverer, String> {
        let resolver = route::resolver(&config.delivery.dns)?;
        Ok(Deliverer {
            config,
            resources,
            resolver,
            tls: crate::client::tls_connector(tls::opportunistic_client_config()),
            verified_tls: std::sync::OnceLock::new(),
        })
    }

    /// The resources this deliverer signs with.
    pub fn resources(&self) -> &Arc<dyn ResourceSource> {
        &self.resources
    }

    /// DKIM-Signature headers for the message, from the sender's MailDomain.
    fn signatures(&self, entry: &QueueEntry, body: &[u8]) -> Result<Vec<u8>, String> {
        let resources = self.resources.current();
        let domain = resources.domain(&entry.sender_domain).ok_or_else(|| {
            format!(
                "MailDomain {} is gone; DKIM key unavailable",
                entry.sender_domain
            )
        })?;
        if domain.keys.is_empty() {
            return Err(format!(
                "MailDomain {} has no DKIM key",
                entry.sender_domain
            ));
        }
        let signers = domain
            .keys
            .iter()
            .map(|k| Signer::new(domain.domain.as_str(), k))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        sign_all(&signers, body).map_err(|e| e.to_string())
    }

    /// The smarthost route for this entry: the account's, else its MailDomain's.
    fn smarthost(&self, entry: &QueueEntry) -> Option<ResolvedRoute> {
        let resources = self.resources.current();
        resources
            .account_by_id(&entry.account)
            .and_then(|a| a.smarthost.clone())
            .or_else(|| {
                resources
                    .domain(&entry.sender_domain)
                    .and_then(|d| d.smarthost.clone())
            })
    }

    fn connector_for(&self, route: &ResolvedRoute) -> Result<TlsConnector, String> {
        if route.trust_any_certificate {
            return Ok(self.tls.clone());
        }
        self.verified_tls
            .get_or_init(|| {
                tls::verified_client_config()
                    .map(crate::client::tls_connector)
                    .map_err(|e| e.to_string())
            })
            .clone()
    }

    /// Checks the greeting and says EHLO; on a refusal the session is closed and the reply
    /// becomes the error.
    async fn greet(&self, conn: &mut Connection, greeting: RemoteReply) -> Result<(), String> {
        if greeting.code != 220 {
            return Err(format!("greeting: {greeting}"));
        }
        let hello = conn
            .hello(&self.config.delivery.hostname)
            .await
            .map_err(|e| e.to_string())?;
        if !hello.is_positive() {
            return Err(format!("EHLO: {hello}"));
        }
        Ok(())
    }

    /// A session to the smarthost ready for MAIL: TLS as the route demands (never a
    /// plaintext fallback), then AUTH when the route has credentials.
    async fn open_route(
        &self,
        route: &ResolvedRoute,
        addr: SocketAddr,
    ) -> Result<Connection, String> {
        let d = &self.config.delivery;
        let (mut conn, greeting) = match route.tls {
            RouteTls::Implicit => {
                let connector = self.connector_for(route)?;
                Connection::connect_tls(
                    addr,
                    &connector,
                    &route.host,
                    d.connect_timeout,
                    d.command_timeout,
                )
                .await
                .map_err(|e| e.to_string())?
            }
            RouteTls::Starttls | RouteTls::None => {
                Connection::connect(addr, d.connect_timeout, d.command_timeout)
                    .await
                    .map_err(|e| e.to_string())?
            }
        };
        if let Err(e) = self.greet(&mut conn, greeting).await {
            conn.quit().await;
            return Err(e);
        }
        if route.tls == RouteTls::Starttls {
            if !conn.capabilities.starttls {
                conn.quit().await;
                return Err(
                    "the smarthost does not offer STARTTLS, which the route requires".into(),
                );
            }
            let connector = self.connector_for(route)?;
            let r = conn
                .starttls(&connector, &route.host)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            if r.code != 220 {
                conn.quit().await;
                return Err(format!("STARTTLS: {r}"));
            }
            let hello = conn.hello(&d.hostname).await.map_err(|e| e.to_string())?;
            if !hello.is_positive() {
                conn.quit().await;
                return Err(format!("EHLO after STARTTLS: {hello}"));
            }
        }
        match &route.credentials {
            None => {}
            Some(Err(missing)) => {
                conn.quit().await;
                return Err(missing.clone());
            }
            Some(Ok((user, password))) => {
                let r = conn
                    .auth_plain(user, password)
                    .await
                    .map_err(|e| e.to_string())?;
                if r.code != 235 {
                    conn.quit().await;
                    return Err(format!("AUTH at the smarthost: {r}"));
                }
            }
        }
        Ok(conn)
    }

    /// Addresses of the smarthost: an IP literal, or the host's A/AAAA records.
    async fn route_addrs(&self, route: &ResolvedRoute) -> Result<Vec<SocketAddr>, String> {
        if let Ok(ip) = route.host.parse::<std::net::IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, route.port)]);
        }
        let fqdn = format!("{}.", route.host.trim_end_matches('.'));
        let ips = self
            .resolver
            .lookup_ip(fqdn.as_str())
            .await
            .map_err(|e| format!("smarthost {}: {e}", route.host))?;
        Ok(ips
            .iter()
            .map(|ip| SocketAddr::new(ip, route.port))
            .collect())
    }

    /// Delivers through the smarthost; any trouble reaching it defers (the mail stays ours).
    async fn via_smarthost(
        &self,
        route: &ResolvedRoute,
        entry: &QueueEntry,
        prefix: &[u8],
        body: &[u8],
    ) -> Attempt {
        let addrs = match self.route_addrs(route).await {
            Ok(a) if !a.is_empty() => a,
            Ok(_) => {
                return Attempt::all(
                    entry,
                    Outcome::Deferred(format!("smarthost {} has no address", route.host)),
                );
            }
            Err(e) => return Attempt::all(entry, Outcome::Deferred(e)),
        };
        let mut last_error = String::new();
        for addr in addrs {
            let span = info_span!(
                "smtp.client",
                server.address = %route.host,
                server.port = addr.port(),
                network.peer.address = %addr.ip(),
                network.local.address = tracing::field::Empty,
                herald.tls = tracing::field::Empty,
                herald.smtp.reply_code = tracing::field::Empty,
                herald.smarthost = true,
                error.type = tracing::field::Empty,
            );
            let result = async {
                let conn = self.open_route(route, addr).await?;
                self.transact(conn, &route.host, addr, entry, prefix, body)
                    .await
            }
            .instrument(span.clone())
            .await;
            match result {
                Ok(attempt) => return attempt,
                Err(e) => {
                    span.record("error.type", "connection");
                    info!(queue_id = %entry.id, smarthost = %route.host, %addr, error = %e, "smarthost failed");
                    last_error = format!("smarthost {} [{}]: {e}", route.host, addr);
                }
            }
        }
        Attempt::all(entry, Outcome::Deferred(last_error))
    }

    async fn hops(&self, entry: &QueueEntry) -> Result<Vec<Hop>, route::RouteError> {
        if let Some(relay) = self.config.delivery.relay_host {
            return Ok(vec![Hop {
                name: relay.ip().to_string(),
                addrs: vec![relay],
            }]);
        }
        route::resolve(
            &self.resolver,
            &entry.domain,
            self.config.delivery.smtp_port,
        )
        .await
    }

    /// Makes one attempt. Never returns an error: every problem is an outcome.
    pub async fn attempt(&self, entry: &QueueEntry, body: &[u8]) -> Attempt {
        let prefix = match self.signatures(entry, body) {
            Ok(p) => p,
            // A missing key is a configuration gap that an operator can fix: defer, never
            // send unsigned.
            Err(reason) => return Attempt::all(entry, Outcome::Deferred(reason)),
        };
        if let Some(route) = self.smarthost(entry) {
            return self.via_smarthost(&route, entry, &prefix, body).await;
        }
        let hops = match self.hops(entry).await {
            Ok(h) => h,
            Err(e) if e.is_permanent() => {
                return Attempt::all(entry, Outcome::Failed(format!("5.1.2 {e}")));
            }
            Err(e) => return Attempt::all(entry, Outcome::Deferred(e.to_string())),
        };
        let mut last_error = String::from("no host tried");
        for hop in &hops {
            for &addr in &hop.addrs {
                let span = info_span!(
                    "smtp.client",
                    server.address = %hop.name,
                    server.port = addr.port(),
                    network.peer.address = %addr.ip(),
                    network.local.address = tracing::field::Empty,
                    herald.tls = tracing::field::Empty,
                    herald.smtp.reply_code = tracing::field::Empty,
                    error.type = tracing::field::Empty,
                );
                match self
                    .try_host(hop, addr, entry, &prefix, body)
                    .instrument(span.clone())
                    .await
                {
                    Ok(attempt) => return attempt,
                    Err(e) => {
                        span.record("error.type", "connection");
                        info!(queue_id = %entry.id, host = %hop.name, %addr, error = %e, "host failed, trying the next");
                        last_error = format!("{} [{}]: {e}", hop.name, addr);
                    }
                }
            }
        }
        Attempt::all(entry, Outcome::Deferred(last_error))
    }

    /// Opens a session ready for MAIL: greeting, EHLO, STARTTLS when offered. With
    /// `try_tls` false the session stays in plaintext (retry after a failed handshake).
    async fn open(&self, hop: &Hop, addr: SocketAddr, try_tls: bool) -> Result<Connection, String> {
        let d = &self.config.delivery;
        let (mut conn, greeting) = Connection::connect(addr, d.connect_timeout, d.command_timeout)
            .await
            .map_err(|e| e.to_string())?;
        if let Err(e) = self.greet(&mut conn, greeting).await {
            conn.quit().await;
            return Err(e);
        }
        if try_tls && conn.capabilities.starttls {
            match conn.starttls(&self.tls, &hop.name).await {
                Ok(r) if r.code == 220 => {
                    let hello = conn.hello(&d.hostname).await.map_err(|e| e.to_string())?;
                    if !hello.is_positive() {
                        conn.quit().await;
                        return Err(format!("EHLO after STARTTLS: {hello}"));
                    }
                }
                Ok(r) => debug!(reply = %r, "STARTTLS refused; continuing in plaintext"),
                Err(e @ ClientError::Tls(_)) | Err(e @ ClientError::Timeout) => {
                    return Err(format!("TLS: {e}"));
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        if d.require_tls && !conn.is_tls() {
            conn.quit().await;
            return Err("TLS is required but the host does not offer it".into());
        }
        Ok(conn)
    }

    async fn try_host(
        &self,
        hop: &Hop,
        addr: SocketAddr,
        entry: &QueueEntry,
        prefix: &[u8],
        body: &[u8],
    ) -> Result<Attempt, String> {
        let conn = match self.open(hop, addr, true).await {
            Ok(c) => c,
            // Like other MTAs: a failed handshake is retried in plaintext on the same host,
            // unless policy demands TLS.
            Err(e) if e.starts_with("TLS:") && !self.config.delivery.require_tls => {
                warn!(host = %hop.name, %addr, error = %e, "TLS handshake failed; retrying in plaintext");
                self.open(hop, addr, false).await?
            }
            Err(e) => return Err(e),
        };
        self.transact(conn, &hop.name, addr, entry, prefix, body)
            .await
    }

    /// One transaction on an open session: envelope, data, per-recipient outcomes.
    async fn transact(
        &self,
        conn: Connection,
        host: &str,
        addr: SocketAddr,
        entry: &QueueEntry,
        prefix: &[u8],
        body: &[u8],
    ) -> Result<Attempt, String> {
        let mut conn = conn;
        let tls = conn.is_tls();
        let span = tracing::Span::current();
        span.record("herald.tls", tls);
        if let Some(local) = conn.local {
            span.record("network.local.address", local.ip().to_string());
        }
        let remote_host = format!("{} [{}]", host, addr.ip());
        let done = |outcomes| Attempt {
            outcomes,
            remote_host: remote_host.clone(),
            tls,
        };
        if entry.smtputf8 && !conn.capabilities.smtputf8 {
            conn.quit().await;
            return Ok(Attempt {
                remote_host: remote_host.clone(),
                tls,
                ..Attempt::all(
                    entry,
                    Outcome::Failed(format!(
                        "5.6.7 {} does not support SMTPUTF8, which this message needs",
                        host
                    )),
                )
            });
        }
        let mut mail_from = format!("MAIL FROM:<{}>", entry.sender);
        if let Some(limit) = conn.capabilities.size {
            if body.len() + prefix.len() > limit {
                conn.quit().await;
                return Ok(Attempt {
                    remote_host: remote_host.clone(),
                    tls,
                    ..Attempt::all(
                        entry,
                        Outcome::Failed(format!(
                            "5.3.4 message of {} octets exceeds {}'s limit of {limit}",
                            body.len() + prefix.len(),
                            host
                        )),
                    )
                });
            }
            mail_from.push_str(&format!(" SIZE={}", body.len() + prefix.len()));
        }
        if entry.eight_bit && conn.capabilities.eight_bit_mime {
            mail_from.push_str(" BODY=8BITMIME");
        }
        if entry.smtputf8 {
            mail_from.push_str(" SMTPUTF8");
        }
        let rcpts: Vec<String> = entry.recipients.iter().map(|r| r.address.clone()).collect();
        let (mail, replies) = match conn.envelope(&mail_from, &rcpts).await {
            Ok(r) => r,
            Err(e) => return Err(e.to_string()),
        };
        if !mail.is_positive() {
            record_reply(&mail);
            conn.quit().await;
            let o = outcome_for(&mail);
            return Ok(done(rcpts.into_iter().map(|r| (r, o.clone())).collect()));
        }
        let mut outcomes: Vec<(String, Outcome)> = rcpts
            .iter()
            .cloned()
            .zip(replies.iter().map(outcome_for))
            .collect();
        if !outcomes
            .iter()
            .any(|(_, o)| matches!(o, Outcome::Delivered(_)))
        {
            let _ = conn.command("RSET").await;
            conn.quit().await;
            return Ok(done(outcomes));
        }
        let data_timeout = self
            .config
            .delivery
            .command_timeout
            .max(std::time::Duration::from_secs(600));
        let final_reply = match conn.data(prefix, body, data_timeout).await {
            Ok(r) => {
                record_reply(&r);
                outcome_for(&r)
            }
            // The server may or may not have the message: deferring risks a duplicate,
            // never a loss.
            Err(e) => Outcome::Deferred(format!("{remote_host}: connection lost after DATA: {e}")),
        };
        for (_, o) in outcomes.iter_mut() {
            if matches!(o, Outcome::Delivered(_)) {
                *o = final_reply.clone();
            }
        }
        conn.quit().await;
        Ok(done(outcomes))
    }
}
