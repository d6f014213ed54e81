//! One SMTP submission session: greeting, EHLO, STARTTLS, AUTH, then transactions.
//! Policy is checked as the dialogue runs so that each refusal names its reason at the
//! command that caused it.

use std::{net::SocketAddr, sync::Arc};

use herald_core::{
    config::{Config, ListenerConfig, ListenerTls},
    limits::Limits,
    metrics::IngressMetrics,
    queue::Queue,
    resources::{AccountView, ResourceSource, SenderDomainRefusal},
    return_path::ReturnPaths,
    smtp::{Data, Incoming, SmtpIo},
    suppression::Suppression,
    telemetry,
    types::Mailbox,
    verp::Verp,
};
use smtp_proto::{AUTH_LOGIN, AUTH_PLAIN, MAIL_BODY_8BITMIME, MAIL_SMTPUTF8, Request};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, info, info_span, warn};

use crate::{
    auth::{Credentials, decode_line, decode_plain},
    content::{check_lines, from_domains},
    enqueue::{Submission, enqueue},
    inbound::{self, Returned},
    reply::{self, Reply},
};

/// Errors after which the session is closed (RFC 5321 leaves the number to the server).
const MAX_ERRORS: u32 = 10;
const MAX_AUTH_LINE: usize = 12 * 1024;

/// What every session of one listener shares.
pub struct SessionContext {
    pub config: Arc<Config>,
    pub listener: ListenerConfig,
    pub resources: Arc<dyn ResourceSource>,
    pub queue: Queue,
    pub tls: Option<TlsAcceptor>,
    pub shutdown: watch::Receiver<bool>,
    pub metrics: IngressMetrics,
    pub limits: Limits,
    pub suppression: Suppression,
    /// Records of messages sent with a return path (written at queueing, read by bounces).
    pub return_paths: ReturnPaths,
    pub verp: Verp,
}

struct Transaction {
    /// `None` for the null sender, which only the inbound listener accepts (bounces).
    sender: Option<Mailbox>,
    sender_domain: String,
    recipients: Vec<(String, String)>,
    /// Inbound listener: the messages the return-path recipients stand for.
    returned: Vec<Returned>,
    smtputf8: bool,
    eight_bit: bool,
}

struct Session {
    io: SmtpIo,
    ctx: Arc<SessionContext>,
    peer: SocketAddr,
    helo: Option<String>,
    account: Option<AccountView>,
    txn: Option<Transaction>,
    errors: u32,
    /// The account was bound by the client's network, not by AUTH (AUTH may replace it).
    by_network: bool,
}

enum Next {
    Continue,
    Close,
}

/// Runs a session to its end. Never panics on client input; every exit is logged.
pub async fn run(io: SmtpIo, peer: SocketAddr, ctx: Arc<SessionContext>) {
    let span = info_span!(
        "smtp.session",
        listener = %ctx.listener.name,
        herald.account = tracing::field::Empty,
        network.peer.address = %peer.ip(),
        network.peer.port = peer.port(),
        server.port = ctx.listener.addr.port(),
    );
    ctx.metrics.connections.add(
        1,
        &[opentelemetry::KeyValue::new(
            "listener",
            ctx.listener.name.clone(),
        )],
    );
    let mut session = Session {
        io,
        ctx,
        peer,
        helo: None,
        account: None,
        txn: None,
        errors: 0,
        by_network: false,
    };
    async move {
        if let Err(e) = session.serve().await {
            info!(error = %e, "session ended by I/O error");
        }
        session.io.shutdown().await;
    }
    .instrument(span)
    .await
}

impl Session {
    fn hostname(&self) -> &str {
        &self.ctx.config.ingress.hostname
    }

    fn send(&mut self, r: Reply) {
        self.io.reply(r.code, r.esc, &r.text);
    }

    /// Counts a client error; past the limit the session is closed.
    fn fail(&mut self, r: Reply) -> Next {
        self.send(r);
        self.errors += 1;
        if self.errors >= MAX_ERRORS {
            self.send(Reply::too_many_errors());
            return Next::Close;
        }
        Next::Continue
    }

    /// Binds the account whose client networks contain the peer, if any.
    fn bind_client_network(&mut self) {
        // An inbound listener serves no account: bounces are matched by their recipient.
        if self.ctx.listener.inbound {
            return;
        }
        let resources = self.ctx.resources.current();
        if let Some(a) = resources.account_for_client(self.peer.ip()) {
            info!(account = %a.id, "client network bound to account");
            tracing::Span::current().record("herald.account", a.id.as_str());
            self.account = Some(a.clone());
            self.by_network = true;
        }
    }

    async fn serve(&mut self) -> std::io::Result<()> {
        self.bind_client_network();
        let greeting = format!("{} ESMTP Herald", self.hostname());
        self.io.reply(220, "", &greeting);
        let timeout = self.ctx.config.ingress.command_timeout;
        loop {
            if *self.ctx.shutdown.borrow() && self.txn.is_none() && !self.io.has_buffered_input() {
                let r = Reply::shutting_down(self.hostname());
                self.send(r);
                return self.io.flush().await;
            }
            let mut shutdown = self.ctx.shutdown.clone();
            let idle = self.txn.is_none();
            let read = tokio::select! {
                r = self.io.next_request(timeout) => r,
                // An idle session is told at once; one inside a transaction may finish it.
                _ = async { let _ = shutdown.wait_for(|&stop| stop).await; }, if idle => {
                    let r = Reply::shutting_down(self.hostname());
                    self.send(r);
                    return self.io.flush().await;
                }
            };
            let incoming = match read {
                Ok(i) => i,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    let r = Reply::timeout(self.hostname());
                    self.send(r);
                    return self.io.flush().await;
                }
                Err(e) => return Err(e),
            };
            let next = match incoming {
                Incoming::Closed => return Ok(()),
                Incoming::Invalid(e) => self.fail(reply::for_parse_error(&e)),
                Incoming::Request(req) => self.handle(req).await?,
            };
            if let Next::Close = next {
                return self.io.flush().await;
            }
        }
    }

    async fn handle(&mut self, req: Request<String>) -> std::io::Result<Next> {
        Ok(match req {
            Request::Ehlo { host } => {
                self.ehlo(host);
                Next::Continue
            }
            Request::Helo { host } => {
                self.txn = None;
                self.helo = Some(host);
                let text = self.hostname().to_string();
                self.io.reply(250, "", &text);
                Next::Continue
            }
            Request::Lhlo { .. } => self.fail(Reply::not_implemented()),
            Request::StartTls => return self.starttls().await,
            Request::Auth {
                mechanism,
                initial_response,
            } => return self.auth(mechanism, initial_response).await,
            Request::Mail { from } => self.mail(from),
            Request::Rcpt { to } => self.rcpt(to).await,
            Request::Data => return self.data().await,
            Request::Rset => {
                self.txn = None;
                self.send(Reply::ok());
                Next::Continue
            }
            Request::Noop { .. } => {
                self.send(Reply::ok());
                Next::Continue
            }
            Request::Quit => {
                self.send(Reply::bye());
                Next::Close
            }
            Request::Vrfy { .. } => {
                self.send(Reply::vrfy());
                Next::Continue
            }
            Request::Help { .. } => {
                self.send(Reply::help());
                Next::Continue
            }
            Request::Bdat { .. }
            | Request::Expn { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. } => self.fail(Reply::not_implemented()),
        })
    }

    /// True when this client IP failed AUTH too often, on any pod, within the window.
    async fn auth_blocked(&self) -> bool {
        match self.ctx.limits.auth_failures(self.peer.ip()).await {
            Ok(n) => n >= self.ctx.config.ingress.max_auth_failures,
            // The shared store is down: fail open for this check only; passwords are still
            // verified, and queueing will refuse with 451 anyway.
            Err(e) => {
                warn!(error = %e, "AUTH failure count unavailable");
                false
            }
        }
    }

    fn auth_offered(&self) -> bool {
        !self.ctx.listener.inbound && (self.io.is_tls() || self.ctx.listener.allow_plaintext_auth)
    }

    fn starttls_offered(&self) -> bool {
        self.ctx.listener.tls == ListenerTls::Starttls
            && self.ctx.tls.is_some()
            && !self.io.is_tls()
    }

    fn ehlo(&mut self, host: String) {
        self.txn = None;
        self.helo = Some(host);
        let ingress = &self.ctx.config.ingress;
        let mut lines = vec![format!("{} Hello", ingress.hostname)];
        lines.push("PIPELINING".into());
        lines.push(format!("SIZE {}", ingress.max_message_size));
        lines.push("8BITMIME".into());
        lines.push("ENHANCEDSTATUSCODES".into());
        if self.starttls_offered() {
            lines.push("STARTTLS".into());
        }
        if self.auth_offered() && (self.account.is_none() || self.by_network) {
            lines.push("AUTH PLAIN LOGIN".into());
        }
        lines.push("SMTPUTF8".into());
        let text = lines.join("\n");
        self.io.reply(250, "", &text);
    }

    async fn starttls(&mut self) -> std::io::Result<Next> {
        if self.io.is_tls() {
            return Ok(self.fail(Reply::already_tls()));
        }
        let Some(acceptor) = self.ctx.tls.clone().filter(|_| self.starttls_offered()) else {
            return Ok(self.fail(Reply::tls_unavailable()));
        };
        self.send(Reply::ready_for_tls());
        if let Err(e) = self
            .io
            .start_tls(&acceptor, self.ctx.config.ingress.command_timeout)
            .await
        {
            // The stream is in an unknown state: nothing more can be said on it.
            info!(error = %e, "TLS handshake failed");
            return Ok(Next::Close);
        }
        // RFC 3207 4.2: forget everything learnt before TLS.
        self.helo = None;
        self.account = None;
        self.by_network = false;
        self.txn = None;
        self.bind_client_network();
        Ok(Next::Continue)
    }

    async fn auth(&mut self, mechanism: u64, initial: String) -> std::io::Result<Next> {
        if self.helo.is_none() {
            return Ok(self.fail(Reply::need_helo()));
        }
        if self.account.is_some() && !self.by_network {
            return Ok(self.fail(Reply::already_authenticated()));
        }
        if self.txn.is_some() {
            return Ok(self.fail(Reply::auth_in_transaction()));
        }
        if self.ctx.listener.inbound {
            return Ok(self.fail(Reply::auth_not_offered()));
        }
        if !self.auth_offered() {
            return Ok(self.fail(Reply::encryption_required()));
        }
        if self.auth_blocked().await {
            self.send(Reply::auth_blocked(&self.peer.ip().to_string()));
            return Ok(Next::Close);
        }
        let timeout = self.ctx.config.ingress.command_timeout;
        let credentials = if mechanism == AUTH_PLAIN {
            let response = if initial.is_empty() {
                self.io.reply(334, "", "");
                self.io.flush().await?;
                match self.io.read_line(MAX_AUTH_LINE, timeout).await? {
                    Some(line) => line,
                    None => return Ok(Next::Close),
                }
            } else {
                initial
            };
            if response.trim() == "*" {
                return Ok(self.fail(Reply::auth_cancelled()));
            }
            match decode_plain(&response) {
                Some(c) => c,
                None => return Ok(self.fail(Reply::auth_malformed())),
            }
        } else if mechanism == AUTH_LOGIN {
            let username = if initial.is_empty() {
                self.io.reply(334, "", "VXNlcm5hbWU6");
                self.io.flush().await?;
                match self.io.read_line(MAX_AUTH_LINE, timeout).await? {
                    Some(line) => line,
                    None => return Ok(Next::Close),
                }
            } else {
                initial
            };
            if username.trim() == "*" {
                return Ok(self.fail(Reply::auth_cancelled()));
            }
            self.io.reply(334, "", "UGFzc3dvcmQ6");
            self.io.flush().await?;
            let Some(password) = self.io.read_line(MAX_AUTH_LINE, timeout).await? else {
                return Ok(Next::Close);
            };
            if password.trim() == "*" {
                return Ok(self.fail(Reply::auth_cancelled()));
            }
            match (decode_line(&username), decode_line(&password)) {
                (Some(username), Some(password)) => Credentials { username, password },
                _ => return Ok(self.fail(Reply::auth_malformed())),
            }
        } else {
            return Ok(self.fail(Reply::unsupported_mechanism()));
        };
        let resources = self.ctx.resources.current();
        let account = resources.account(&credentials.username).filter(|a| {
            a.password
                .as_ref()
                .is_some_and(|p| p.verify(&credentials.password))
        });
        match account {
            Some(a) => {
                info!(account = %a.id, "authenticated");
                tracing::Span::current().record("herald.account", a.id.as_str());
                self.account = Some(a.clone());
                self.by_network = false;
                self.send(Reply::auth_ok());
                Ok(Next::Continue)
            }
            None => {
                warn!(username = %credentials.username, "authentication failed");
                self.ctx.metrics.auth_failures.add(1, &[]);
                let failures = match self.ctx.limits.record_auth_failure(self.peer.ip()).await {
                    Ok(n) => n,
                    Err(e) => {
                        warn!(error = %e, "AUTH failure not recorded");
                        0
                    }
                };
                let next = self.fail(Reply::bad_credentials());
                if failures >= self.ctx.config.ingress.max_auth_failures {
                    self.send(Reply::auth_blocked(&self.peer.ip().to_string()));
                    return Ok(Next::Close);
                }
                Ok(next)
            }
        }
    }

    fn mail(&mut self, from: smtp_proto::MailFrom<String>) -> Next {
        if self.helo.is_none() {
            return self.fail(Reply::need_helo());
        }
        if self.txn.is_some() {
            return self.fail(Reply::nested_mail());
        }
        let max = self.ctx.config.ingress.max_message_size;
        if from.size > max {
            return self.fail(Reply::message_too_big(max));
        }
        if self.ctx.listener.inbound {
            return self.inbound_mail(from);
        }
        if from.address.is_empty() {
            return self.fail(Reply::null_sender_refused());
        }
        let Some(sender) = Mailbox::parse(&from.address) else {
            return self.fail(Reply::bad_sender_syntax());
        };
        let smtputf8 = from.flags & MAIL_SMTPUTF8 != 0;
        if sender.is_utf8() && !smtputf8 {
            return self.fail(Reply::utf8_needs_smtputf8());
        }
        // Unauthenticated: the sender is kept for the log only; every RCPT will be refused
        // (no open relay), as MTAs do for relay attempts.
        let Some(account) = self.account.clone() else {
            self.send(Reply::sender_ok(&from.address));
            self.txn = Some(Transaction {
                sender: Some(sender),
                sender_domain: String::new(),
                recipients: Vec::new(),
                returned: Vec::new(),
                smtputf8,
                eight_bit: from.flags & MAIL_BODY_8BITMIME != 0,
            });
            return Next::Continue;
        };
        let resources = self.ctx.resources.current();
        let domain = match resources.sender_domain(&account, sender.domain()) {
            Ok(d) => d.id.clone(),
            Err(SenderDomainRefusal::NotAllowed) => {
                self.ctx.metrics.refused("sender_domain_not_allowed");
                return self.fail(Reply::sender_domain_not_allowed(sender.domain().as_str()));
            }
            Err(SenderDomainRefusal::NotReady(reason)) => {
                self.ctx.metrics.refused("sender_domain_not_verified");
                return self.fail(Reply::sender_domain_not_verified(
                    sender.domain().as_str(),
                    &reason,
                ));
            }
        };
        self.send(Reply::sender_ok(&from.address));
        self.txn = Some(Transaction {
            sender: Some(sender),
            sender_domain: domain,
            recipients: Vec::new(),
            returned: Vec::new(),
            smtputf8,
            eight_bit: from.flags & MAIL_BODY_8BITMIME != 0,
        });
        Next::Continue
    }

    /// MAIL on the inbound listener: any sender, the null sender above all (bounces).
    fn inbound_mail(&mut self, from: smtp_proto::MailFrom<String>) -> Next {
        let sender = if from.address.is_empty() {
            None
        } else {
            match Mailbox::parse(&from.address) {
                Some(m) => Some(m),
                None => return self.fail(Reply::bad_sender_syntax()),
            }
        };
        self.send(Reply::sender_ok(&from.address));
        self.txn = Some(Transaction {
            sender,
            sender_domain: String::new(),
            recipients: Vec::new(),
            returned: Vec::new(),
            smtputf8: from.flags & MAIL_SMTPUTF8 != 0,
            eight_bit: from.flags & MAIL_BODY_8BITMIME != 0,
        });
        Next::Continue
    }

    /// RCPT on the inbound listener: only return-path addresses of recorded messages.
    async fn inbound_rcpt(&mut self, to: smtp_proto::RcptTo<String>) -> Next {
        let max = self.ctx.config.ingress.max_recipients;
        let Some(txn) = self.txn.as_ref() else {
            return self.fail(Reply::need_mail());
        };
        if txn.returned.len() >= max {
            self.send(Reply::too_many_recipients(max));
            return Next::Continue;
        }
        let Some(rcpt) = Mailbox::parse(&to.address) else {
            return self.fail(Reply::bad_recipient_syntax());
        };
        match inbound::recipient(&self.ctx, &rcpt).await {
            Ok(returned) => {
                let Some(txn) = self.txn.as_mut() else {
                    return self.fail(Reply::need_mail());
                };
                txn.returned.push(returned);
                self.send(Reply::recipient_ok(&to.address));
                Next::Continue
            }
            // Temporary (the records cannot be read): not the client's error.
            Err(r) if r.code < 500 => {
                self.send(r);
                Next::Continue
            }
            Err(r) => self.fail(r),
        }
    }

    /// 354, then the message up to its end: the transaction and its bytes, or what the
    /// session does instead (too large: 552 and on; closed or timed out: close).
    async fn read_message(&mut self) -> std::io::Result<Result<(Transaction, Vec<u8>), Next>> {
        self.send(Reply::start_data());
        let max = self.ctx.config.ingress.max_message_size;
        let data = self
            .io
            .read_data(max, self.ctx.config.ingress.data_timeout)
            .await;
        let Some(txn) = self.txn.take() else {
            return Ok(Err(Next::Close));
        };
        match data {
            Ok(Data::Message(body)) => Ok(Ok((txn, body))),
            Ok(Data::TooLarge) => {
                self.ctx.metrics.refused("message_too_big");
                self.send(Reply::message_too_big(max));
                Ok(Err(Next::Continue))
            }
            Ok(Data::Closed) => Ok(Err(Next::Close)),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                let r = Reply::timeout(self.hostname());
                self.send(r);
                Ok(Err(Next::Close))
            }
            Err(e) => Err(e),
        }
    }

    /// DATA on the inbound listener: read, process the report, never queue anything.
    async fn inbound_data(&mut self) -> std::io::Result<Next> {
        match &self.txn {
            None => return Ok(self.fail(Reply::need_mail())),
            Some(t) if t.returned.is_empty() => return Ok(self.fail(Reply::need_rcpt())),
            Some(_) => {}
        }
        // Line-ending and header checks protect what is relayed; this message is only
        // read, so a sloppy bounce still counts.
        let (txn, body) = match self.read_message().await? {
            Ok(got) => got,
            Err(next) => return Ok(next),
        };
        let sender = txn
            .sender
            .as_ref()
            .map(|m| m.to_string())
            .unwrap_or_default();
        let span = info_span!(
            "smtp.inbound",
            herald.sender = %sender,
            herald.recipients = txn.returned.len(),
            messaging.message.body.size = body.len(),
        );
        let result = inbound::process(&self.ctx, &txn.returned, &body)
            .instrument(span)
            .await;
        match result {
            Ok(p) => {
                let outcome = if p.report {
                    "bounce_report"
                } else {
                    "returned_other"
                };
                self.ctx
                    .metrics
                    .messages
                    .add(1, &[opentelemetry::KeyValue::new("outcome", outcome)]);
                if p.report {
                    self.send(Reply::report_processed());
                } else {
                    self.send(Reply::returned_message_accepted());
                }
            }
            Err(r) => self.send(r),
        }
        Ok(Next::Continue)
    }

    async fn rcpt(&mut self, to: smtp_proto::RcptTo<String>) -> Next {
        if self.ctx.listener.inbound {
            return self.inbound_rcpt(to).await;
        }
        // No open relay: without an authenticated account nothing is accepted, whatever the
        // order of commands.
        if self.account.is_none() {
            self.ctx.metrics.refused("auth_required");
            return self.fail(Reply::auth_required());
        }
        let max = self.ctx.config.ingress.max_recipients;
        let Some(txn) = self.txn.as_mut() else {
            return self.fail(Reply::need_mail());
        };
        if txn.recipients.len() >= max {
            self.send(Reply::too_many_recipients(max));
            return Next::Continue;
        }
        let Some(rcpt) = Mailbox::parse(&to.address) else {
            return self.fail(Reply::bad_recipient_syntax());
        };
        if rcpt.is_utf8() && !txn.smtputf8 {
            return self.fail(Reply::utf8_needs_smtputf8());
        }
        // Hard-bounced before: refused here rather than bounced again later.
        let account_id = self
            .account
            .as_ref()
            .map(|a| a.id.clone())
            .unwrap_or_default();
        match self
            .ctx
            .suppression
            .reason(&account_id, &rcpt.to_string())
            .await
        {
            Ok(Some(_)) => {
                self.ctx.metrics.refused("suppressed");
                self.send(Reply::suppressed(&to.address));
                return Next::Continue;
            }
            Ok(None) => {}
            Err(e) => warn!(error = %e, "suppression list unavailable"),
        }
        let Some(txn) = self.txn.as_ref() else {
            return self.fail(Reply::need_mail());
        };
        let wanted = txn.recipients.len() as u64 + 1;
        if let Some(refusal) = self.hourly_refusal(wanted).await {
            self.send(refusal);
            return Next::Continue;
        }
        let Some(txn) = self.txn.as_mut() else {
            return self.fail(Reply::need_mail());
        };
        txn.recipients
            .push((rcpt.to_string(), rcpt.domain().as_str().to_string()));
        self.send(Reply::recipient_ok(&to.address));
        Next::Continue
    }

    /// The refusal owed when `wanted` more recipient-messages would pass the account's
    /// hourly ceiling (limit plus tolerance), counted across every pod.
    async fn hourly_refusal(&self, wanted: u64) -> Option<Reply> {
        let account = self.account.as_ref()?;
        let ceiling = account.policy.hourly_ceiling()?;
        let limit = account.policy.hourly_limit?;
        let hour = unix_now() / 3600;
        match self.ctx.limits.hourly_count(&account.id, hour).await {
            Ok(count) if count + wanted > ceiling => {
                self.ctx.metrics.refused("hourly_limit");
                Some(Reply::hourly_limit(
                    limit,
                    &account.id,
                    &hour_start_utc(hour + 1),
                ))
            }
            Ok(_) => None,
            Err(e) => {
                warn!(error = %e, "hourly count unavailable");
                Some(Reply::limits_unavailable())
            }
        }
    }

    /// Every header From address must be under a domain the account may send from.
    fn check_header_from(&self, account: &AccountView, body: &[u8]) -> Result<(), Reply> {
        let resources = self.ctx.resources.current();
        for domain in from_domains(body)? {
            match resources.sender_domain(account, &domain) {
                Ok(_) => {}
                Err(SenderDomainRefusal::NotAllowed) => {
                    return Err(Reply::from_domain_not_allowed(domain.as_str()));
                }
                Err(SenderDomainRefusal::NotReady(reason)) => {
                    return Err(Reply::sender_domain_not_verified(domain.as_str(), &reason));
                }
            }
        }
        Ok(())
    }

    async fn data(&mut self) -> std::io::Result<Next> {
        if self.ctx.listener.inbound {
            return self.inbound_data().await;
        }
        let Some(account) = self.account.clone() else {
            return Ok(self.fail(Reply::auth_required()));
        };
        match &self.txn {
            None => return Ok(self.fail(Reply::need_mail())),
            Some(t) if t.recipients.is_empty() => return Ok(self.fail(Reply::need_rcpt())),
            Some(_) => {}
        }
        // Each message is its own trace (a session may carry many); the session span is
        // linked, not the parent.
        let span = info_span!(
            parent: None,
            "smtp.transaction",
            herald.account = %account.id,
            client.address = %self.peer.ip(),
            herald.recipients = tracing::field::Empty,
            messaging.message.body.size = tracing::field::Empty,
            messaging.message.id = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
        );
        span.follows_from(tracing::Span::current());
        if let Some(id) = telemetry::trace_id(&span) {
            span.record("trace_id", id.as_str());
        }
        if let Some(id) = telemetry::span_id(&span) {
            span.record("span_id", id.as_str());
        }
        let (txn, body) = match self.read_message().await? {
            Ok(got) => got,
            Err(next) => return Ok(next),
        };
        if !body.is_ascii() && !txn.eight_bit && !txn.smtputf8 {
            self.ctx.metrics.refused("undeclared_8bit");
            return Ok(self.fail(Reply::eight_bit_needs_declaration()));
        }
        let ingress = &self.ctx.config.ingress;
        let body = match check_lines(body, ingress.bare_line_endings, ingress.max_line_length) {
            Ok(b) => b,
            Err(r) => {
                self.ctx.metrics.refused("line_syntax");
                return Ok(self.fail(r));
            }
        };
        if let Err(r) = self.check_header_from(&account, &body) {
            self.ctx.metrics.refused("from_domain_not_allowed");
            return Ok(self.fail(r));
        }
        // Count the message against the hourly limit, for the whole cluster at once.
        let hour = unix_now() / 3600;
        let rcpt_count = txn.recipients.len() as u64;
        let mut held_until = None;
        if let (Some(limit), Some(ceiling)) =
            (account.policy.hourly_limit, account.policy.hourly_ceiling())
        {
            match self
                .ctx
                .limits
                .add_hourly(&account.id, hour, rcpt_count, ceiling)
                .await
            {
                Ok(Some(count)) if count > limit => held_until = Some(hour + 1),
                Ok(Some(_)) => {}
                Ok(None) => {
                    self.ctx.metrics.refused("hourly_limit");
                    self.send(Reply::hourly_limit(
                        limit,
                        &account.id,
                        &hour_start_utc(hour + 1),
                    ));
                    return Ok(Next::Continue);
                }
                Err(e) => {
                    warn!(error = %e, "hourly count unavailable");
                    self.send(Reply::limits_unavailable());
                    return Ok(Next::Continue);
                }
            }
        }
        let counted = account.policy.hourly_limit.is_some();
        // Bounces for this message come back to Herald when its MailDomain has a return path.
        let return_path = self
            .ctx
            .resources
            .current()
            .domain(&txn.sender_domain)
            .and_then(|d| d.return_path.clone());
        let submission = Submission {
            account: account.id.clone(),
            sender: txn
                .sender
                .as_ref()
                .map(|m| m.to_string())
                .unwrap_or_default(),
            sender_domain: txn.sender_domain,
            recipients: txn.recipients,
            body,
            client_ip: self.peer.ip().to_string(),
            helo: self.helo.clone().unwrap_or_default(),
            tls: self.io.tls_info(),
            smtputf8: txn.smtputf8,
            eight_bit: txn.eight_bit,
            traceparent: telemetry::traceparent(&span).unwrap_or_default(),
            defaults: account.policy.sender_defaults.clone(),
            not_before: held_until.map(|h| h * 3600).unwrap_or(0),
            return_path,
        };
        let size = submission.body.len();
        span.record("herald.recipients", submission.recipients.len());
        span.record("messaging.message.body.size", size);
        let result = enqueue(
            &self.ctx.queue,
            &self.ctx.return_paths,
            &self.ctx.config.ingress.hostname,
            submission,
        )
        .instrument(span.clone())
        .await;
        match result {
            Ok(id) => {
                span.record("messaging.message.id", id.as_str());
                info!(parent: &span, queue_id = %id, "queued");
                self.ctx
                    .metrics
                    .messages
                    .add(1, &[opentelemetry::KeyValue::new("outcome", "accepted")]);
                self.ctx.metrics.message_size.record(size as u64, &[]);
                match held_until {
                    Some(h) => self.send(Reply::queued_held(id.as_str(), &hour_start_utc(h))),
                    None => self.send(Reply::queued(id.as_str())),
                }
            }
            Err(e) => {
                warn!(parent: &span, error = %e, "message refused with 451");
                self.ctx.metrics.refused("queue_unavailable");
                if counted {
                    self.ctx
                        .limits
                        .release_hourly(&account.id, hour, rcpt_count)
                        .await;
                }
                self.send(Reply::queue_unavailable());
            }
        }
        Ok(Next::Continue)
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `HH:MM` (UTC) at which Unix hour `hour` starts.
fn hour_start_utc(hour: i64) -> String {
    format!("{:02}:00", hour.rem_euclid(24))
}
