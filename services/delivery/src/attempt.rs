//! One delivery attempt of one queue entry: sign, find the hosts and their site, pick a
//! source the site's throttles allow, send over a new or reused connection, and say for
//! each recipient whether it was delivered, deferred or failed. Replies feed the
//! traffic-shaping rules and the source's reputation.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use herald_core::{
    config::Config,
    envelope::QueueEntry,
    resources::ResourceSource,
    route::{ResolvedRoute, RouteTls},
    tls,
};
use hickory_resolver::TokioResolver;
use rand::Rng;
use tokio_rustls::TlsConnector;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    client::{ClientError, Connection, RemoteReply},
    dkim::{SignerCache, sign_all},
    downgrade,
    egress::{self, Egress, Source, Unavailable},
    reuse::{IdlePool, Session},
    route::{self, Hop},
    rules::{Effect, Rules},
    shaping::{SharedState, Verdict, now_ms},
    site::Site,
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
    /// The source address the message left from, when a connection was made.
    pub source_ip: String,
    /// The destination site (MX host set or provider), when one was determined.
    pub site: String,
    /// Time the attempt took (set by the worker).
    pub duration: Duration,
}

/// An attempt, or no attempt at all because the throttles of every usable source say "not
/// now": the entry waits (without counting as an attempt) until `until_ms`.
#[derive(Debug)]
pub enum Delivery {
    Done(Attempt),
    Wait(Unavailable),
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
            source_ip: String::new(),
            site: String::new(),
            duration: Duration::ZERO,
        }
    }
}

/// A host that could not be used, and what it said when it said something.
#[derive(Debug)]
struct HostFailure {
    text: String,
    reply: Option<RemoteReply>,
}

impl HostFailure {
    fn text(text: impl Into<String>) -> HostFailure {
        HostFailure {
            text: text.into(),
            reply: None,
        }
    }
    fn reply(stage: &str, reply: RemoteReply) -> HostFailure {
        HostFailure {
            text: format!("{stage}: {reply}"),
            reply: Some(reply),
        }
    }
}

impl From<ClientError> for HostFailure {
    fn from(e: ClientError) -> Self {
        HostFailure::text(e.to_string())
    }
}

/// The signed message in the form a host needs: as queued, or converted to 7 bits for a
/// host without 8BITMIME (and signed again, since the body changed).
struct Prepared<'a> {
    prefix: Vec<u8>,
    body: &'a [u8],
    seven_bit: std::sync::OnceLock<Result<SignedMessage, String>>,
}

/// DKIM-Signature headers and the body they sign.
type SignedMessage = (Vec<u8>, Vec<u8>);

/// What one transaction on an open session gave.
struct Transaction {
    outcomes: Vec<(String, Outcome)>,
    /// Every negative reply, for the shaping rules.
    negatives: Vec<RemoteReply>,
    /// The session may carry another message.
    reusable: bool,
}

/// A transaction that broke off; `before_data` when no message data was sent, so that on a
/// reused connection it can be tried again on a fresh one.
struct Broken {
    text: String,
    before_data: bool,
}

/// Everything an attempt needs, shared by all attempts of a worker.
pub struct Deliverer {
    config: Arc<Config>,
    resources: Arc<dyn ResourceSource>,
    resolver: TokioResolver,
    tls: TlsConnector,
    /// Verifying connector for smarthosts, built on first use from the system's roots.
    verified_tls: std::sync::OnceLock<Result<TlsConnector, String>>,
    egress: Egress,
    state: SharedState,
    idle: IdlePool,
    rules: Rules,
    signers: SignerCache,
    /// Entries of this pod in flight per site: bounded, so that a saturated site never
    /// occupies every worker.
    in_flight: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

impl Deliverer {
    pub fn new(
        config: Arc<Config>,
        resources: Arc<dyn ResourceSource>,
        state: SharedState,
    ) -> Result<Deliverer, String> {
        let resolver = route::resolver(&config.delivery.dns)?;
        let rules = Rules::compile(&config.delivery.shaping.rules)?;
        let idle = IdlePool::new(config.delivery.shaping.idle_timeout);
        idle.spawn_reaper(state.clone());
        Ok(Deliverer {
            egress: Egress::new(&config.delivery),
            config,
            resources,
            resolver,
            tls: crate::client::tls_connector(tls::opportunistic_client_config()),
            verified_tls: std::sync::OnceLock::new(),
            state,
            idle,
            rules,
            signers: SignerCache::default(),
            in_flight: Arc::default(),
        })
    }

    /// The resources this deliverer signs with.
    pub fn resources(&self) -> &Arc<dyn ResourceSource> {
        &self.resources
    }

    pub fn state(&self) -> &SharedState {
        &self.state
    }

    /// Closes idle connections (shutdown).
    pub async fn close_idle(&self) {
        self.idle.close_all(&self.state).await;
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
            .map(|k| self.signers.get(domain.domain.as_str(), k))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        sign_all(&signers, body).map_err(|e| e.to_string())
    }

    /// The message for a host without 8BITMIME: converted once, then signed again.
    fn seven_bit<'p>(
        &self,
        entry: &QueueEntry,
        prepared: &'p Prepared<'_>,
    ) -> Result<(&'p [u8], &'p [u8]), String> {
        let converted = prepared.seven_bit.get_or_init(|| {
            let body = downgrade::to_seven_bit(prepared.body).map_err(|e| e.to_string())?;
            let prefix = self.signatures(entry, &body)?;
            Ok((prefix, body))
        });
        match converted {
            Ok((p, b)) => Ok((p, b)),
            Err(e) => Err(e.clone()),
        }
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

    /// The egress pool for this entry: the account's, else its MailDomain's, else default.
    fn pool(&self, entry: &QueueEntry) -> Option<String> {
        let resources = self.resources.current();
        resources
            .account_by_id(&entry.account)
            .and_then(|a| a.policy.egress_pool.clone())
            .or_else(|| {
                resources
                    .domain(&entry.sender_domain)
                    .and_then(|d| d.egress_pool.clone())
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
    async fn greet(
        &self,
        conn: &mut Connection,
        greeting: RemoteReply,
        ehlo: &str,
    ) -> Result<(), HostFailure> {
        if greeting.code != 220 {
            return Err(HostFailure::reply("greeting", greeting));
        }
        let hello = conn.hello(ehlo).await?;
        if !hello.is_positive() {
            return Err(HostFailure::reply("EHLO", hello));
        }
        Ok(())
    }

    /// A session to the smarthost ready for MAIL: TLS as the route demands (never a
    /// plaintext fallback), then AUTH when the route has credentials.
    async fn open_route(
        &self,
        route: &ResolvedRoute,
        addr: SocketAddr,
    ) -> Result<Connection, HostFailure> {
        let d = &self.config.delivery;
        let (mut conn, greeting) = match route.tls {
            RouteTls::Implicit => {
                let connector = self.connector_for(route).map_err(HostFailure::text)?;
                Connection::connect_tls(
                    addr,
                    &connector,
                    &route.host,
                    d.connect_timeout,
                    d.command_timeout,
                )
                .await?
            }
            RouteTls::Starttls | RouteTls::None => {
                Connection::connect(addr, None, d.connect_timeout, d.command_timeout).await?
            }
        };
        if let Err(e) = self.greet(&mut conn, greeting, &d.hostname).await {
            conn.quit().await;
            return Err(e);
        }
        if route.tls == RouteTls::Starttls {
            if !conn.capabilities.starttls {
                conn.quit().await;
                return Err(HostFailure::text(
                    "the smarthost does not offer STARTTLS, which the route requires",
                ));
            }
            let connector = self.connector_for(route).map_err(HostFailure::text)?;
            let r = conn
                .starttls(&connector, &route.host)
                .await
                .map_err(|e| HostFailure::text(format!("TLS: {e}")))?;
            if r.code != 220 {
                conn.quit().await;
                return Err(HostFailure::reply("STARTTLS", r));
            }
            let hello = conn.hello(&d.hostname).await?;
            if !hello.is_positive() {
                conn.quit().await;
                return Err(HostFailure::reply("EHLO after STARTTLS", hello));
            }
        }
        match &route.credentials {
            None => {}
            Some(Err(missing)) => {
                conn.quit().await;
                return Err(HostFailure::text(missing.clone()));
            }
            Some(Ok((user, password))) => {
                let r = conn.auth_plain(user, password).await?;
                if r.code != 235 {
                    conn.quit().await;
                    return Err(HostFailure::reply("AUTH at the smarthost", r));
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
    /// The upstream relay does its own shaping: no pools or site throttles apply here.
    async fn via_smarthost(
        &self,
        route: &ResolvedRoute,
        entry: &QueueEntry,
        prepared: &Prepared<'_>,
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
                let mut conn = self.open_route(route, addr).await?;
                let t = self
                    .transact(&mut conn, &route.host, entry, prepared)
                    .await
                    .map_err(|b| HostFailure::text(b.text));
                conn.quit().await;
                t
            }
            .instrument(span.clone())
            .await;
            match result {
                Ok(t) => {
                    return Attempt {
                        outcomes: t.outcomes,
                        remote_host: format!("{} [{}]", route.host, addr.ip()),
                        tls: true,
                        source_ip: String::new(),
                        site: route.host.clone(),
                        duration: Duration::ZERO,
                    };
                }
                Err(e) => {
                    span.record("error.type", "connection");
                    info!(queue_id = %entry.id, smarthost = %route.host, %addr, error = %e.text, "smarthost failed");
                    last_error = format!("smarthost {} [{}]: {}", route.host, addr, e.text);
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

    /// Makes one attempt, or says when to come back. Never returns an error: every problem
    /// is an outcome.
    pub async fn attempt(&self, entry: &QueueEntry, body: &[u8]) -> Delivery {
        let prefix = match self.signatures(entry, body) {
            Ok(p) => p,
            // A missing key is a configuration gap that an operator can fix: defer, never
            // send unsigned.
            Err(reason) => return Delivery::Done(Attempt::all(entry, Outcome::Deferred(reason))),
        };
        let prepared = Prepared {
            prefix,
            body,
            seven_bit: std::sync::OnceLock::new(),
        };
        if let Some(route) = self.smarthost(entry) {
            return Delivery::Done(self.via_smarthost(&route, entry, &prepared).await);
        }
        let hops = match self.hops(entry).await {
            Ok(h) => h,
            Err(e) if e.is_permanent() => {
                return Delivery::Done(Attempt::all(entry, Outcome::Failed(format!("5.1.2 {e}"))));
            }
            Err(e) => return Delivery::Done(Attempt::all(entry, Outcome::Deferred(e.to_string()))),
        };
        let shaping = &self.config.delivery.shaping;
        let names: Vec<String> = hops.iter().map(|h| h.name.clone()).collect();
        let site = Site::of(&names, shaping);
        // Only sources that can reach some address of the destination (IPv4 or IPv6).
        let all_members = self.egress.members(self.pool(entry).as_deref());
        let members: Vec<_> = all_members
            .iter()
            .filter(|(s, _)| {
                hops.iter()
                    .flat_map(|h| &h.addrs)
                    .any(|a| s.reaches(&a.ip()))
            })
            .cloned()
            .collect();
        if members.is_empty() {
            return Delivery::Done(Attempt::all(
                entry,
                Outcome::Deferred(format!(
                    "no source of the egress pool shares an address family with {}",
                    site.label
                )),
            ));
        }
        let sources = match egress::usable(
            &self.state,
            members,
            &site,
            &self.config.delivery.warmup.schedule,
            shaping.reputation_floor,
            shaping.reputation_min_samples,
        )
        .await
        {
            Ok(s) => s,
            Err(u) => return Delivery::Wait(u),
        };
        // As many of this pod's entries per site as its sources may have connections; the
        // rest go back to the queue at once instead of waiting in a worker.
        let cap = (site.limits.max_connections as usize).saturating_mul(sources.len().max(1));
        let Some(_gate) = SiteGate::enter(&self.in_flight, &site.key, cap) else {
            return Delivery::Wait(Unavailable {
                kind: "busy",
                until_ms: now_ms() + 250,
                reason: format!("{cap} entries for {} already in progress here", site.label),
            });
        };
        let mut wait: Option<Unavailable> = None;
        for source in sources {
            let session = match self.admit(&source, &site).await {
                Admission::Session(s) => *s,
                Admission::Slot(slot) => {
                    match self.connect(&source, &site, &hops, slot, entry).await {
                        Ok(s) => s,
                        Err(attempt) => return Delivery::Done(attempt),
                    }
                }
                Admission::Wait(u) => {
                    if wait.as_ref().is_none_or(|w| u.until_ms < w.until_ms) {
                        wait = Some(u);
                    }
                    continue;
                }
            };
            match self.pace(&source, &site, session).await {
                Ok(session) => {
                    return Delivery::Done(
                        self.deliver(&source, &site, &hops, session, entry, &prepared)
                            .await,
                    );
                }
                Err(u) => {
                    if wait.as_ref().is_none_or(|w| u.until_ms < w.until_ms) {
                        wait = Some(u);
                    }
                }
            }
        }
        Delivery::Wait(wait.unwrap_or(Unavailable {
            kind: "no_source",
            until_ms: now_ms() + 1000,
            reason: "no source available".into(),
        }))
    }

    /// A connection for a message from `source` to `site`: an idle session, or a free
    /// connection slot (claimed across pods) to open a new one. Waits inside the worker at
    /// most `hold_max`; beyond that the entry waits in the queue instead.
    async fn admit(&self, source: &Source, site: &Site) -> Admission {
        let shaping = &self.config.delivery.shaping;
        let deadline = tokio::time::Instant::now() + shaping.hold_max;
        if let Some(s) = self.idle.take(&source.key, &site.key) {
            return Admission::Session(Box::new(s));
        }
        loop {
            match self
                .state
                .claim_slot(&source.key, &site.key, site.limits.max_connections)
                .await
            {
                Ok(Some(slot)) => return Admission::Slot(Some(slot)),
                Ok(None) => {}
                Err(e) => {
                    warn!(error = %e, "connection slots unavailable; connecting without one");
                    return Admission::Slot(None);
                }
            }
            // A connection may have become idle meanwhile.
            if let Some(s) = self.idle.take(&source.key, &site.key) {
                return Admission::Session(Box::new(s));
            }
            if tokio::time::Instant::now() >= deadline {
                let pause = rand::rng().random_range(500..1500);
                return Admission::Wait(Unavailable {
                    kind: "connections",
                    until_ms: now_ms() + pause,
                    reason: format!(
                        "all {} connections from {} to {} are busy",
                        site.limits.max_connections, source.name, site.label
                    ),
                });
            }
            let pause = rand::rng().random_range(20..120);
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    }

    /// The message-rate slot and today's warm-up allowance, taken on an open session right
    /// before MAIL FROM, so that what the remote host sees is paced, not what we planned.
    /// When the message cannot go now the session is kept idle for the next one.
    async fn pace(
        &self,
        source: &Source,
        site: &Site,
        session: Session,
    ) -> Result<Session, Unavailable> {
        let shaping = &self.config.delivery.shaping;
        let deadline = tokio::time::Instant::now() + shaping.hold_max;
        loop {
            match self
                .state
                .take_rate(
                    &source.key,
                    &site.key,
                    site.limits.max_rate,
                    shaping.cut_rate_base,
                )
                .await
            {
                Ok((None, _)) => break,
                Ok((Some(wait), _)) => {
                    if tokio::time::Instant::now() + wait > deadline {
                        self.idle.put(&source.key, &site.key, session);
                        return Err(Unavailable {
                            kind: "rate",
                            until_ms: now_ms() + wait.as_millis() as i64,
                            reason: format!(
                                "message rate from {} to {} is at its limit",
                                source.name, site.label
                            ),
                        });
                    }
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    warn!(error = %e, "rate state unavailable; sending without it");
                    break;
                }
            }
        }
        if !source.warmup {
            return Ok(session);
        }
        // Counted only once everything else lets the message go.
        let cap = self
            .state
            .warmup_cap(&source.key, &self.config.delivery.warmup.schedule)
            .await;
        let Ok(Some(cap)) = cap else {
            return Ok(session);
        };
        match self
            .state
            .warmup_take(&source.key, &site.provider, cap)
            .await
        {
            Ok(true) => Ok(session),
            Ok(false) => {
                self.idle.put(&source.key, &site.key, session);
                let tomorrow = (now_ms().div_euclid(86_400_000) + 1) * 86_400_000;
                Err(Unavailable {
                    kind: "warmup",
                    until_ms: tomorrow,
                    reason: format!(
                        "source {} reached today's warm-up cap of {cap} for {}",
                        source.name, site.label
                    ),
                })
            }
            Err(e) => {
                warn!(error = %e, "warm-up count not recorded");
                Ok(session)
            }
        }
    }

    /// Opens a connection from `source` to the first host that takes it.
    async fn connect(
        &self,
        source: &Source,
        site: &Site,
        hops: &[Hop],
        slot: Option<crate::shaping::Slot>,
        entry: &QueueEntry,
    ) -> Result<Session, Attempt> {
        let mut last_error = String::from("no host tried");
        let mut refusals = Vec::new();
        for hop in hops {
            for &addr in hop.addrs.iter().filter(|a| source.reaches(&a.ip())) {
                let span = info_span!(
                    "smtp.client.connect",
                    server.address = %hop.name,
                    server.port = addr.port(),
                    network.peer.address = %addr.ip(),
                    network.local.address = %source.ip_label(),
                    error.type = tracing::field::Empty,
                );
                match self
                    .open_mx(source, hop, addr)
                    .instrument(span.clone())
                    .await
                {
                    Ok(conn) => {
                        self.learn(source, site, &refusals).await;
                        return Ok(Session::new(conn, slot, hop.name.clone(), addr));
                    }
                    Err(e) => {
                        span.record("error.type", "connection");
                        info!(queue_id = %entry.id, host = %hop.name, %addr, source = %source.name, error = %e.text, "host failed, trying the next");
                        last_error = format!("{} [{}]: {}", hop.name, addr, e.text);
                        refusals.extend(e.reply);
                    }
                }
            }
        }
        if let Some(slot) = slot {
            self.state.release_slot(slot).await;
        }
        self.learn(source, site, &refusals).await;
        for _ in &entry.recipients {
            self.state
                .record(&source.key, &site.provider, Verdict::Deferred);
        }
        Err(Attempt {
            source_ip: source.ip_label(),
            site: site.label.clone(),
            ..Attempt::all(entry, Outcome::Deferred(last_error))
        })
    }

    /// Opens a session ready for MAIL: TCP from the source, greeting, EHLO, STARTTLS when
    /// offered; a failed handshake is retried in plaintext on the same host, like other
    /// MTAs, unless policy demands TLS.
    async fn open_mx(
        &self,
        source: &Source,
        hop: &Hop,
        addr: SocketAddr,
    ) -> Result<Connection, HostFailure> {
        match self.open_mx_once(source, hop, addr, true).await {
            Err(e) if e.text.starts_with("TLS:") && !self.config.delivery.require_tls => {
                warn!(host = %hop.name, %addr, error = %e.text, "TLS handshake failed; retrying in plaintext");
                self.open_mx_once(source, hop, addr, false).await
            }
            other => other,
        }
    }

    async fn open_mx_once(
        &self,
        source: &Source,
        hop: &Hop,
        addr: SocketAddr,
        try_tls: bool,
    ) -> Result<Connection, HostFailure> {
        let d = &self.config.delivery;
        let (mut conn, greeting) =
            Connection::connect(addr, source.addr, d.connect_timeout, d.command_timeout).await?;
        if let Err(e) = self.greet(&mut conn, greeting, &source.ehlo).await {
            conn.quit().await;
            return Err(e);
        }
        if try_tls && conn.capabilities.starttls {
            match conn.starttls(&self.tls, &hop.name).await {
                Ok(r) if r.code == 220 => {
                    let hello = conn.hello(&source.ehlo).await?;
                    if !hello.is_positive() {
                        conn.quit().await;
                        return Err(HostFailure::reply("EHLO after STARTTLS", hello));
                    }
                }
                Ok(r) => debug!(reply = %r, "STARTTLS refused; continuing in plaintext"),
                Err(e @ ClientError::Tls(_)) | Err(e @ ClientError::Timeout) => {
                    return Err(HostFailure::text(format!("TLS: {e}")));
                }
                Err(e) => return Err(e.into()),
            }
        }
        if d.require_tls && !conn.is_tls() {
            conn.quit().await;
            return Err(HostFailure::text(
                "TLS is required but the host does not offer it",
            ));
        }
        Ok(conn)
    }

    /// Sends the entry over `session` (reconnecting once when a reused connection turns out
    /// to be dead before any data went), then keeps or closes the session.
    async fn deliver(
        &self,
        source: &Source,
        site: &Site,
        hops: &[Hop],
        mut session: Session,
        entry: &QueueEntry,
        prepared: &Prepared<'_>,
    ) -> Attempt {
        let started = std::time::Instant::now();
        let mut reused = session.sent > 0;
        loop {
            let span = info_span!(
                "smtp.client",
                server.address = %session.host,
                server.port = session.addr.port(),
                network.peer.address = %session.addr.ip(),
                network.local.address = %source.ip_label(),
                herald.tls = session.conn.is_tls(),
                herald.reused = reused,
                herald.site = %site.label,
                herald.smtp.reply_code = tracing::field::Empty,
                error.type = tracing::field::Empty,
            );
            let host = session.host.clone();
            let result = self
                .transact(&mut session.conn, &host, entry, prepared)
                .instrument(span.clone())
                .await;
            let remote_host = format!("{} [{}]", session.host, session.addr.ip());
            let tls = session.conn.is_tls();
            // The address the remote host saw, also when the OS picked it.
            let source_ip = session
                .conn
                .local
                .map(|a| a.ip().to_string())
                .unwrap_or_else(|| source.ip_label());
            match result {
                Ok(t) => {
                    session.sent += 1;
                    self.learn(source, site, &t.negatives).await;
                    self.account(source, site, &t.outcomes).await;
                    debug!(elapsed = ?started.elapsed(), sent = session.sent, "transaction done");
                    self.keep_or_close(source, site, session, t.reusable).await;
                    return Attempt {
                        outcomes: t.outcomes,
                        remote_host,
                        tls,
                        source_ip,
                        site: site.label.clone(),
                        duration: Duration::ZERO,
                    };
                }
                Err(b) if reused && b.before_data => {
                    // The remote side closed the idle connection: a fresh one, same slot.
                    debug!(error = %b.text, "reused connection was dead; reconnecting");
                    let slot = session.slot.take();
                    session.conn.quit().await;
                    match self.connect(source, site, hops, slot, entry).await {
                        Ok(s) => {
                            session = s;
                            reused = false;
                        }
                        Err(attempt) => return attempt,
                    }
                }
                Err(b) => {
                    span.record("error.type", "connection");
                    session.close(&self.state).await;
                    for _ in &entry.recipients {
                        self.state
                            .record(&source.key, &site.provider, Verdict::Deferred);
                    }
                    return Attempt {
                        source_ip,
                        site: site.label.clone(),
                        remote_host: remote_host.clone(),
                        tls,
                        ..Attempt::all(
                            entry,
                            Outcome::Deferred(format!("{remote_host}: {}", b.text)),
                        )
                    };
                }
            }
        }
    }

    async fn keep_or_close(&self, source: &Source, site: &Site, mut session: Session, ok: bool) {
        if !ok || session.sent >= site.limits.max_messages_per_connection {
            session.close(&self.state).await;
            return;
        }
        if let Some(slot) = session.slot.as_mut()
            && self.state.slot_is_old(slot)
        {
            self.state.refresh_slot(slot).await;
        }
        self.idle.put(&source.key, &site.key, session);
    }

    /// Per-recipient outcomes into the source's reputation; a cut rate recovers a little
    /// with each delivery.
    async fn account(&self, source: &Source, site: &Site, outcomes: &[(String, Outcome)]) {
        let mut delivered = false;
        for (_, o) in outcomes {
            let verdict = match o {
                Outcome::Delivered(_) => {
                    delivered = true;
                    Verdict::Delivered
                }
                Outcome::Deferred(_) => Verdict::Deferred,
                Outcome::Failed(why) => {
                    match herald_core::bounce::classify(&crate::dsn::status_of(why), why) {
                        "policy" | "reputation" => Verdict::Blocked,
                        _ => Verdict::Bounced,
                    }
                }
            };
            self.state.record(&source.key, &site.provider, verdict);
        }
        if delivered {
            self.state
                .recover_rate(
                    &source.key,
                    &site.key,
                    self.config.delivery.shaping.rate_recovery_step,
                )
                .await;
        }
    }

    /// Runs the shaping rules over the negative replies of one attempt; each rule counts
    /// once per attempt.
    async fn learn(&self, source: &Source, site: &Site, replies: &[RemoteReply]) {
        for effect in self
            .rules
            .fire(&self.state, &source.key, &site.key, replies)
            .await
        {
            let Effect {
                rule,
                action,
                duration,
                reply,
            } = effect;
            use herald_core::egress::RuleAction;
            let until_ms = now_ms() + duration.as_millis() as i64;
            let suspension = crate::shaping::Suspension {
                until_ms,
                rule: rule.clone(),
                reply: reply.to_string(),
            };
            let r = match action {
                RuleAction::Suspend | RuleAction::SuspendProvider => {
                    let whole = action == RuleAction::SuspendProvider;
                    warn!(source = %source.name, site = %site.label, rule = %rule, reply = %reply, ?duration, provider = whole, "suspending source for site");
                    self.state
                        .record(&source.key, &site.provider, Verdict::Blocked);
                    self.state
                        .suspend(&source.key, &site.key, &site.provider, whole, suspension)
                        .await
                }
                RuleAction::CutRate => match self.state.cut_rate(&source.key, &site.key).await {
                    Ok(f) => {
                        warn!(source = %source.name, site = %site.label, rule = %rule, reply = %reply, factor = f, "cutting message rate");
                        Ok(())
                    }
                    Err(e) => Err(e),
                },
                RuleAction::Bounce => Ok(()),
            };
            crate::worker::count_rule(&rule, action);
            if let Err(e) = r {
                warn!(error = %e, rule = %rule, "shaping action not recorded");
            }
        }
    }

    fn outcome_for(&self, reply: &RemoteReply) -> Outcome {
        if reply.is_positive() {
            Outcome::Delivered(reply.clone())
        } else if reply.is_transient() && !self.rules.bounces(reply) {
            Outcome::Deferred(reply.to_string())
        } else {
            Outcome::Failed(reply.to_string())
        }
    }

    /// One transaction on an open session: envelope, data, per-recipient outcomes.
    async fn transact(
        &self,
        conn: &mut Connection,
        host: &str,
        entry: &QueueEntry,
        prepared: &Prepared<'_>,
    ) -> Result<Transaction, Broken> {
        let span = tracing::Span::current();
        if let Some(local) = conn.local {
            span.record("network.local.address", local.ip().to_string());
        }
        let broken = |before_data: bool| {
            move |e: ClientError| Broken {
                text: e.to_string(),
                before_data,
            }
        };
        let all = |outcome: Outcome| Transaction {
            outcomes: entry
                .recipients
                .iter()
                .map(|r| (r.address.clone(), outcome.clone()))
                .collect(),
            negatives: Vec::new(),
            reusable: true,
        };
        if entry.smtputf8 && !conn.capabilities.smtputf8 {
            return Ok(all(Outcome::Failed(format!(
                "5.6.7 {host} does not support SMTPUTF8, which this message needs"
            ))));
        }
        let (prefix, body): (&[u8], &[u8]) = if entry.eight_bit && !conn.capabilities.eight_bit_mime
        {
            match self.seven_bit(entry, prepared) {
                Ok(pair) => pair,
                Err(e) => {
                    return Ok(all(Outcome::Failed(format!(
                        "5.6.3 {host} does not support 8BITMIME and the message cannot be \
                         converted to 7 bits: {e}"
                    ))));
                }
            }
        } else {
            (&prepared.prefix, prepared.body)
        };
        let size = body.len() + prefix.len();
        let mut mail_from = format!(
            "MAIL FROM:<{}>",
            crate::return_path::envelope_sender(&self.config.bounces, entry)
        );
        if let Some(limit) = conn.capabilities.size {
            if size > limit {
                return Ok(all(Outcome::Failed(format!(
                    "5.3.4 message of {size} octets exceeds {host}'s limit of {limit}"
                ))));
            }
            mail_from.push_str(&format!(" SIZE={size}"));
        }
        if entry.eight_bit && conn.capabilities.eight_bit_mime {
            mail_from.push_str(" BODY=8BITMIME");
        }
        if entry.smtputf8 {
            mail_from.push_str(" SMTPUTF8");
        }
        let rcpts: Vec<String> = entry.recipients.iter().map(|r| r.address.clone()).collect();
        let (mail, replies) = conn
            .envelope(&mail_from, &rcpts)
            .await
            .map_err(broken(true))?;
        let mut negatives: Vec<RemoteReply> = Vec::new();
        if !mail.is_positive() {
            record_reply(&mail);
            let o = self.outcome_for(&mail);
            // After a refused MAIL the session is still in a clean state, but a 421 closes.
            let reusable = mail.code != 421 && conn.command("RSET").await.is_ok();
            negatives.push(mail);
            return Ok(Transaction {
                outcomes: rcpts.into_iter().map(|r| (r, o.clone())).collect(),
                negatives,
                reusable,
            });
        }
        let mut outcomes: Vec<(String, Outcome)> = rcpts
            .iter()
            .cloned()
            .zip(replies.iter().map(|r| self.outcome_for(r)))
            .collect();
        negatives.extend(replies.iter().filter(|r| !r.is_positive()).cloned());
        let closing = replies.iter().any(|r| r.code == 421);
        if !outcomes
            .iter()
            .any(|(_, o)| matches!(o, Outcome::Delivered(_)))
        {
            let reusable = !closing && conn.command("RSET").await.is_ok();
            return Ok(Transaction {
                outcomes,
                negatives,
                reusable,
            });
        }
        let data_timeout = self
            .config
            .delivery
            .command_timeout
            .max(std::time::Duration::from_secs(600));
        let (final_reply, reusable) = match conn.data(prefix, body, data_timeout).await {
            Ok(r) => {
                record_reply(&r);
                let reusable = r.code != 421 && !closing;
                if !r.is_positive() {
                    negatives.push(r.clone());
                }
                (self.outcome_for(&r), reusable)
            }
            // The server may or may not have the message: deferring risks a duplicate,
            // never a loss.
            Err(e) => (
                Outcome::Deferred(format!("{host}: connection lost after DATA: {e}")),
                false,
            ),
        };
        for (_, o) in outcomes.iter_mut() {
            if matches!(o, Outcome::Delivered(_)) {
                *o = final_reply.clone();
            }
        }
        Ok(Transaction {
            outcomes,
            negatives,
            reusable,
        })
    }
}

/// A place among the entries a pod works on for one site; given back on drop.
struct SiteGate {
    counts: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    site: String,
}

impl SiteGate {
    fn enter(
        counts: &Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
        site: &str,
        cap: usize,
    ) -> Option<SiteGate> {
        let mut map = counts.lock().ok()?;
        let n = map.entry(site.to_string()).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(SiteGate {
            counts: counts.clone(),
            site: site.to_string(),
        })
    }
}

impl Drop for SiteGate {
    fn drop(&mut self) {
        if let Ok(mut map) = self.counts.lock()
            && let Some(n) = map.get_mut(&self.site)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.site);
            }
        }
    }
}

/// What [`Deliverer::admit`] grants.
enum Admission {
    /// An open session to reuse.
    Session(Box<Session>),
    /// A connection slot (or none when the slot state is unavailable): connect.
    Slot(Option<crate::shaping::Slot>),
    Wait(Unavailable),
}
