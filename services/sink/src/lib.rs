//! `herald sink`: a receiving SMTP server that accepts every message and stores it in a
//! Maildir. It is the all-in-one mode's destination and a benchmark peer. Local parts
//! `tempfail` and `reject` answer 450 and 550, so tests can script failures.

pub mod maildir;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use herald_core::{
    config::SinkConfig,
    smtp::{self, Conn, Data, Incoming, SmtpIo},
    tls,
};
use smtp_proto::Request;
use tokio::{net::TcpListener, sync::watch, task::JoinSet};
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use crate::maildir::Maildir;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("sink on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("maildir {path}: {source}")]
    Maildir {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Core(#[from] herald_core::Error),
}

const TIMEOUT: Duration = Duration::from_secs(300);
const MAX_SIZE: usize = 64 * 1024 * 1024;

/// Serves until `shutdown` turns true.
pub async fn serve(
    config: SinkConfig,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), SinkError> {
    let maildir =
        Arc::new(
            Maildir::create(&config.maildir).map_err(|source| SinkError::Maildir {
                path: config.maildir.display().to_string(),
                source,
            })?,
        );
    let acceptor = match &config.tls {
        Some(files) => Some(smtp::acceptor(tls::server_config(files)?)),
        None => None,
    };
    let listener = TcpListener::bind(config.addr)
        .await
        .map_err(|source| SinkError::Bind {
            addr: config.addr,
            source,
        })?;
    info!(addr = %config.addr, maildir = %config.maildir.display(), "sink listening");
    let hostname = Arc::new(config.hostname.clone());
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let (maildir, acceptor, hostname) = (maildir.clone(), acceptor.clone(), hostname.clone());
                    sessions.spawn(async move {
                        if let Err(e) = session(SmtpIo::new(Conn::Plain(tcp)), &hostname, acceptor, &maildir).await {
                            info!(%peer, error = %e, "sink session ended");
                        }
                    });
                }
                Err(e) => warn!(error = %e, "accept failed"),
            },
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }
    Ok(())
}

async fn session(
    mut io: SmtpIo,
    hostname: &str,
    acceptor: Option<TlsAcceptor>,
    maildir: &Maildir,
) -> std::io::Result<()> {
    io.reply(220, "", &format!("{hostname} ESMTP Herald sink"));
    let mut sender: Option<String> = None;
    let mut rcpts: Vec<String> = Vec::new();
    loop {
        let req = match io.next_request(TIMEOUT).await? {
            Incoming::Closed => return Ok(()),
            Incoming::Invalid(_) => {
                io.reply(500, "5.5.2", "Syntax error");
                continue;
            }
            Incoming::Request(r) => r,
        };
        match req {
            Request::Ehlo { .. } | Request::Lhlo { .. } => {
                let mut lines = vec![
                    format!("{hostname}"),
                    "PIPELINING".into(),
                    format!("SIZE {MAX_SIZE}"),
                    "8BITMIME".into(),
                    "ENHANCEDSTATUSCODES".into(),
                    "SMTPUTF8".into(),
                ];
                if acceptor.is_some() && !io.is_tls() {
                    lines.push("STARTTLS".into());
                }
                io.reply(250, "", &lines.join("\n"));
                sender = None;
                rcpts.clear();
            }
            Request::Helo { .. } => io.reply(250, "", hostname),
            Request::StartTls => match acceptor.as_ref().filter(|_| !io.is_tls()) {
                Some(a) => {
                    io.reply(220, "2.0.0", "Ready to start TLS");
                    io.start_tls(a, TIMEOUT).await?;
                    sender = None;
                    rcpts.clear();
                }
                None => io.reply(454, "4.7.0", "TLS not available"),
            },
            Request::Mail { from } => {
                sender = Some(from.address);
                rcpts.clear();
                io.reply(250, "2.1.0", "Ok");
            }
            Request::Rcpt { to } => {
                let local = to
                    .address
                    .split('@')
                    .next()
                    .unwrap_or("")
                    .to_ascii_lowercase();
                if sender.is_none() {
                    io.reply(503, "5.5.1", "Need MAIL first");
                } else if local == "tempfail" {
                    io.reply(
                        450,
                        "4.2.0",
                        "Mailbox temporarily unavailable (sink tempfail)",
                    );
                } else if local == "reject" {
                    io.reply(550, "5.1.1", "No such user (sink reject)");
                } else {
                    rcpts.push(to.address);
                    io.reply(250, "2.1.5", "Ok");
                }
            }
            Request::Data => {
                if rcpts.is_empty() {
                    io.reply(503, "5.5.1", "Need RCPT first");
                    continue;
                }
                io.reply(354, "", "End data with <CR><LF>.<CR><LF>");
                match io.read_data(MAX_SIZE, TIMEOUT).await? {
                    Data::Message(body) => {
                        let from = sender.take().unwrap_or_default();
                        let mut stored = format!(
                            "Return-Path: <{from}>\r\nDelivered-To: {}\r\n",
                            rcpts.join(", ")
                        )
                        .into_bytes();
                        stored.extend_from_slice(&body);
                        match maildir.deliver(&stored) {
                            Ok(name) => {
                                info!(file = %name, rcpts = rcpts.len(), "stored");
                                io.reply(250, "2.0.0", &format!("Ok: stored as {name}"));
                            }
                            Err(e) => {
                                warn!(error = %e, "maildir write failed");
                                io.reply(451, "4.3.0", "Local storage error");
                            }
                        }
                    }
                    Data::TooLarge => io.reply(552, "5.3.4", "Message too big"),
                    Data::Closed => return Ok(()),
                }
                rcpts.clear();
            }
            Request::Rset => {
                sender = None;
                rcpts.clear();
                io.reply(250, "2.0.0", "Ok");
            }
            Request::Noop { .. } => io.reply(250, "2.0.0", "Ok"),
            Request::Quit => {
                io.reply(221, "2.0.0", "Bye");
                io.flush().await?;
                return Ok(());
            }
            _ => io.reply(502, "5.5.1", "Command not implemented"),
        }
    }
}
