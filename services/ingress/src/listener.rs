//! Listeners: accept connections, wrap them for TLS as configured, run sessions, drain on
//! shutdown.

use std::{sync::Arc, time::Duration};

use herald_core::{
    admin::Health,
    config::{Config, ListenerTls},
    limits::Limits,
    metrics::IngressMetrics,
    queue::Queue,
    resources::ResourceSource,
    return_path::ReturnPaths,
    smtp::{self, Conn, SmtpIo},
    suppression::Suppression,
    tls,
    verp::Verp,
};
use tokio::{net::TcpListener, sync::watch, task::JoinSet};
use tracing::{error, info};

use crate::{
    reply::Reply,
    session::{self, SessionContext},
};

/// Open connections per client IP on this pod. A slot is given back when dropped.
#[derive(Default)]
struct ConnectionCounts {
    per_ip: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

struct Slot {
    counts: Arc<ConnectionCounts>,
    ip: std::net::IpAddr,
}

impl ConnectionCounts {
    fn admit(
        self: &Arc<Self>,
        ip: std::net::IpAddr,
        max_total: usize,
        max_per_ip: usize,
    ) -> Result<Slot, Reply> {
        let mut map = match self.per_ip.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        let total: usize = map.values().sum();
        if total >= max_total {
            return Err(Reply::too_many_connections());
        }
        let n = map.entry(ip).or_insert(0);
        if *n >= max_per_ip {
            return Err(Reply::too_many_connections_from(&ip.to_string()));
        }
        *n += 1;
        Ok(Slot {
            counts: self.clone(),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut map = match self.counts.per_ip.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("listener {name} on {addr}: {source}")]
    Bind {
        name: String,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("listener {0} needs TLS but ingress.tls has no certificate")]
    NoCertificate(String),
    #[error(transparent)]
    Core(#[from] herald_core::Error),
}

/// Binds every listener, then serves until `shutdown` turns true; then stops accepting and
/// gives open sessions `drain_timeout` to finish.
pub async fn serve(
    config: Arc<Config>,
    resources: Arc<dyn ResourceSource>,
    queue: Queue,
    mut shutdown: watch::Receiver<bool>,
    health: Arc<Health>,
) -> Result<(), ServeError> {
    let acceptor = match &config.ingress.tls {
        Some(files) => Some(smtp::acceptor(tls::server_config(files)?)),
        None => None,
    };
    let metrics = IngressMetrics::new();
    let limits = Limits::setup(
        queue.jetstream(),
        config.nats.replicas,
        config.ingress.auth_failure_window,
    )
    .await?;
    let suppression = Suppression::setup(
        queue.jetstream(),
        config.nats.replicas,
        config.delivery.suppression_ttl,
    )
    .await?;
    let return_paths = ReturnPaths::setup(
        queue.jetstream(),
        config.nats.replicas,
        config.nats.queue_lifetime + config.bounces.record_grace,
        config.nats.publish_timeout,
    )
    .await?;
    let verp = Verp::new(config.bounces.secret.as_deref());
    if !verp.is_tagged() && config.ingress.listeners.iter().any(|l| l.inbound) {
        tracing::warn!(
            "bounces.secret is not set: return-path addresses carry no tag, and anyone who knows a queue id can report bounces for it"
        );
    }
    let connections = Arc::new(ConnectionCounts::default());
    let mut listeners = Vec::new();
    for l in &config.ingress.listeners {
        if l.tls != ListenerTls::None && acceptor.is_none() {
            return Err(ServeError::NoCertificate(l.name.clone()));
        }
        let socket = TcpListener::bind(l.addr)
            .await
            .map_err(|source| ServeError::Bind {
                name: l.name.clone(),
                addr: l.addr,
                source,
            })?;
        info!(listener = %l.name, addr = %l.addr, tls = ?l.tls, inbound = l.inbound, "listening");
        let ctx = Arc::new(SessionContext {
            config: config.clone(),
            listener: l.clone(),
            resources: resources.clone(),
            queue: queue.clone(),
            tls: acceptor.clone(),
            shutdown: shutdown.clone(),
            metrics: metrics.clone(),
            limits: limits.clone(),
            suppression: suppression.clone(),
            return_paths: return_paths.clone(),
            verp: verp.clone(),
        });
        listeners.push((socket, ctx));
    }

    health.set_ready(true);
    let mut sessions = JoinSet::new();
    let mut accepts = JoinSet::new();
    let (conn_tx, mut conn_rx) = tokio::sync::mpsc::channel(64);
    for (socket, ctx) in listeners {
        let tx = conn_tx.clone();
        accepts.spawn(async move {
            loop {
                match socket.accept().await {
                    Ok((tcp, peer)) => {
                        if tx.send((tcp, peer, ctx.clone())).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        error!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
    }
    drop(conn_tx);

    loop {
        tokio::select! {
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    break;
                }
            }
            Some((mut tcp, peer, ctx)) = conn_rx.recv() => {
                let _ = tcp.set_nodelay(true);
                let ingress = &config.ingress;
                let slot = match connections.admit(peer.ip(), ingress.max_connections, ingress.max_connections_per_ip) {
                    Ok(slot) => slot,
                    Err(reply) => {
                        // Refused before any TLS: the reply goes out in clear, then close.
                        info!(network.peer.address = %peer.ip(), reply = %reply, "connection refused");
                        sessions.spawn(async move {
                            use tokio::io::AsyncWriteExt;
                            let _ = tcp.write_all(format!("{reply}\r\n").as_bytes()).await;
                            let _ = tcp.shutdown().await;
                        });
                        continue;
                    }
                };
                sessions.spawn(async move {
                    let _slot = slot;
                    let handshake = ctx.config.ingress.command_timeout;
                    let conn = if ctx.listener.tls == ListenerTls::Implicit {
                        let Some(acceptor) = &ctx.tls else { return };
                        match smtp::accept_implicit_tls(acceptor, tcp, handshake).await {
                            Ok(c) => c,
                            Err(e) => {
                                info!(network.peer.address = %peer.ip(), error = %e, "TLS handshake failed");
                                return;
                            }
                        }
                    } else {
                        Conn::Plain(tcp)
                    };
                    session::run(SmtpIo::new(conn), peer, ctx).await;
                });
            }
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }

    // Not ready first, so load balancers stop sending before sessions are told to go.
    health.set_ready(false);
    accepts.abort_all();
    let open = sessions.len();
    info!(open, "ingress draining: no new connections");
    let drain = config.ingress.drain_timeout;
    let drained = tokio::time::timeout(drain, async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        info!(
            left = sessions.len(),
            "drain timeout: closing remaining sessions"
        );
        sessions.abort_all();
    }
    queue.settle_events(Duration::from_secs(5)).await;
    Ok(())
}
