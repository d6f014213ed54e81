//! End of DATA: trace headers, then the message into JetStream: body once, one entry per
//! destination domain, `Ok` only after every PubAck.

use std::collections::BTreeMap;

use bytes::Bytes;
use herald_core::{
    account::SenderDefaults,
    envelope::{Event, EventKind, QueueEntry, Recipient},
    queue::{Queue, body_digest, submission_key},
    return_path::{ReturnPathRecord, ReturnPaths},
    types::{Domain, QueueId},
};
use mail_parser::{DateTime, MessageParser};

/// One accepted transaction, ready to queue.
pub struct Submission {
    pub account: String,
    pub sender: String,
    pub sender_domain: String,
    pub recipients: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub client_ip: String,
    pub helo: String,
    pub tls: Option<(String, String)>,
    pub smtputf8: bool,
    pub eight_bit: bool,
    /// W3C trace context of the transaction, carried by every queue entry.
    pub traceparent: String,
    /// Headers the account wants added.
    pub defaults: SenderDefaults,
    /// Unix seconds before which delivery may not start (held by the hourly limit), or 0.
    pub not_before: i64,
    /// The sender's MailDomain's return-path host: bounces come back to Herald (VERP).
    pub return_path: Option<Domain>,
}

/// Why a message could not be queued; the client hears 451 and retries.
#[derive(Debug, thiserror::Error)]
#[error("queueing failed: {0}")]
pub struct EnqueueError(#[from] herald_core::Error);

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The headers an MSA adds (RFC 6409 8.2/8.3, RFC 5321 4.4): Received always; Message-ID and
/// Date when the client left them out; then the account's sender defaults, each only where
/// the message does not already carry that header.
fn trace_headers(sub: &Submission, hostname: &str, id: &QueueId, now: i64) -> String {
    let date = DateTime::from_timestamp(now).to_rfc822();
    let protocol = match (sub.tls.is_some(), sub.smtputf8) {
        (true, true) => "UTF8SMTPSA",
        (true, false) => "ESMTPSA",
        (false, true) => "UTF8SMTPA",
        (false, false) => "ESMTPA",
    };
    let tls = sub
        .tls
        .as_ref()
        .map(|(v, c)| format!("\r\n\t(using {v} with cipher {c})"))
        .unwrap_or_default();
    let from = if sub.defaults.hide_client_ip {
        sub.helo.clone()
    } else {
        format!("{} ([{}])", sub.helo, sub.client_ip)
    };
    let mut h = format!(
        "Received: from {from}{tls}\r\n\tby {hostname} (Herald) with {protocol} id {id};\r\n\t{date}\r\n",
    );
    let parsed = MessageParser::new().parse_headers(&sub.body);
    let has = |name: &str| {
        parsed.as_ref().is_some_and(|m| {
            m.headers()
                .iter()
                .any(|hd| hd.name().as_str().eq_ignore_ascii_case(name))
        })
    };
    if !has("Message-ID") {
        h.push_str(&format!("Message-ID: <{id}@{hostname}>\r\n"));
    }
    if !has("Date") {
        h.push_str(&format!("Date: {date}\r\n"));
    }
    let d = &sub.defaults;
    h.push_str(&format!(
        "{}: {}\r\n",
        d.identification_header(),
        sub.account
    ));
    if let Some(reply_to) = d.reply_to.as_deref().filter(|_| !has("Reply-To")) {
        h.push_str(&format!("Reply-To: {reply_to}\r\n"));
    }
    if let Some(to) = d
        .read_receipt_to
        .as_deref()
        .filter(|_| !has("Disposition-Notification-To"))
    {
        h.push_str(&format!("Disposition-Notification-To: {to}\r\n"));
    }
    if let Some(url) = d
        .unsubscribe_url
        .as_deref()
        .filter(|_| !has("List-Unsubscribe"))
    {
        let url = url
            .replace("{queue_id}", id.as_str())
            .replace("{account}", &sub.account);
        h.push_str(&format!(
            "List-Unsubscribe: <{url}>\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        ));
    }
    h
}

/// Queues `sub` and returns its queue id once JetStream has acknowledged everything.
pub async fn enqueue(
    queue: &Queue,
    return_paths: &ReturnPaths,
    hostname: &str,
    sub: Submission,
) -> Result<QueueId, EnqueueError> {
    let id = QueueId::generate();
    let now = now_unix();
    let rcpt_addrs: Vec<String> = sub.recipients.iter().map(|(a, _)| a.clone()).collect();
    // Digest of what the client sent, before our own headers: a retry after a lost 250
    // carries the same bytes and is recognised within the duplicate window. The only pass
    // over the body that hashes it: the stored body's reference carries the same digest.
    let client_digest = body_digest(&sub.body);
    let digest = submission_key(&sub.account, &sub.sender, &rcpt_addrs, &client_digest);
    let mut body = trace_headers(&sub, hostname, &id, now).into_bytes();
    match sub
        .defaults
        .footer
        .as_ref()
        .and_then(|f| crate::footer::append_footer(&sub.body, f))
    {
        Some(with_footer) => body.extend_from_slice(&with_footer),
        None => body.extend_from_slice(&sub.body),
    }
    let message_id = MessageParser::new()
        .parse_headers(&body)
        .and_then(|m| m.message_id().map(str::to_string))
        .unwrap_or_default();
    let size = body.len() as u64;

    // The return-path record is written beside the body, not after it, so that it costs
    // the 250 no extra round trip. Without it a bounce could not be matched: the message
    // then leaves with the app's own sender, and bounces go straight to the app.
    let record = sub.return_path.as_ref().map(|host| {
        (
            host,
            ReturnPathRecord {
                account: sub.account.clone(),
                sender: sub.sender.clone(),
                sender_domain: sub.sender_domain.clone(),
                message_id: message_id.clone(),
                recipients: rcpt_addrs.iter().map(|r| r.to_lowercase()).collect(),
                received_at: now,
            },
        )
    });
    let recorded = async {
        let (host, record) = record.as_ref()?;
        match return_paths.put(id.as_str(), record).await {
            Ok(()) => Some(host.to_string()),
            Err(e) => {
                tracing::warn!(queue_id = %id, error = %e, "return-path record not written; sending with the app's envelope sender");
                None
            }
        }
    };
    let mut by_domain: BTreeMap<&str, Vec<Recipient>> = BTreeMap::new();
    for (address, domain) in &sub.recipients {
        by_domain.entry(domain).or_default().push(Recipient {
            address: address.clone(),
            orcpt: String::new(),
            notify: 0,
        });
    }
    let domains: Vec<String> = by_domain.keys().map(|d| d.to_string()).collect();
    // Sized with the return path it will carry if the record is written (never more).
    let planned_return_path = sub
        .return_path
        .as_ref()
        .map(|h| h.to_string())
        .unwrap_or_default();
    let sole_domain = domains.len() == 1;
    let mut entries: Vec<QueueEntry> = by_domain
        .into_iter()
        .map(|(domain, recipients)| QueueEntry {
            id: id.to_string(),
            account: sub.account.clone(),
            sender: sub.sender.clone(),
            domain: domain.to_string(),
            recipients,
            body: None,
            attempt: 0,
            not_before: sub.not_before,
            received_at: now,
            client_ip: sub.client_ip.clone(),
            sender_domain: sub.sender_domain.clone(),
            smtputf8: sub.smtputf8,
            eight_bit: sub.eight_bit,
            traceparent: sub.traceparent.clone(),
            message_id: message_id.clone(),
            delay_warned: false,
            return_path: planned_return_path.clone(),
            throttle_waits: 0,
            sole_domain,
        })
        .collect();

    // A message with one destination domain finishes with its one entry, and when the two
    // fit in a NATS message the body travels inside it: no body stream write here, no read
    // and purge in delivery. With several domains the body is stored once in the body
    // stream, and a pending record, written beside it, says when the last entry finished.
    let Some(first) = entries.first() else {
        return Err(herald_core::Error::Envelope("a message without recipients".into()).into());
    };
    let stored = queue.place_body(first, Bytes::from(body), hex::encode(client_digest));
    let pending = async {
        if sole_domain {
            return Ok(());
        }
        queue.track_pending(id.as_str(), &domains).await
    };
    let (body_ref, return_path, pending) = tokio::join!(stored, recorded, pending);
    let body_ref = body_ref?;
    pending?;
    let return_path = return_path.unwrap_or_default();
    for entry in &mut entries {
        entry.body = Some(body_ref.clone());
        entry.return_path.clone_from(&return_path);
    }
    // Mail held by the hourly limit waits as a schedule, not in the consumer.
    let results = futures::future::join_all(entries.iter().map(|e| {
        let dedup = Some(format!("{digest}.{}", e.domain));
        async move {
            if e.not_before > now {
                queue.schedule_entry(e, e.not_before, dedup).await
            } else {
                queue.publish_entry(e, dedup).await
            }
        }
    }))
    .await;

    let mut failure = None;
    for (entry, result) in entries.iter().zip(results) {
        match result {
            // Queued earlier by the same submission (a client retry): this copy is not needed.
            Ok(ack) if ack.duplicate => {
                tracing::info!(queue_id = %id, domain = %entry.domain, "duplicate submission within the window");
                queue.finish_domain(entry).await?;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(queue_id = %id, domain = %entry.domain, error = %e, "entry not queued");
                failure = Some(e);
            }
        }
    }
    if let Some(e) = failure {
        // Entries already acked stay queued: they are complete and will be delivered, and
        // the client's retry is de-duplicated against them.
        return Err(e.into());
    }
    // The `received` event does not hold the 250: it is sent now and its acknowledgement
    // awaited apart (a lost one is logged); the entries above are what the 250 promises.
    queue
        .emit_event(Event {
            kind: EventKind::Received as i32,
            queue_id: id.to_string(),
            account: sub.account.clone(),
            sender: sub.sender.clone(),
            recipients: rcpt_addrs,
            at: now,
            message_id,
            size,
            tls: sub.tls.is_some(),
            ..Default::default()
        })
        .await;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(body: &str) -> Submission {
        Submission {
            account: "default/app".into(),
            sender: "a@example.test".into(),
            sender_domain: "default/example-test".into(),
            recipients: vec![("b@other.test".into(), "other.test".into())],
            body: body.as_bytes().to_vec(),
            client_ip: "127.0.0.1".into(),
            helo: "client.test".into(),
            tls: Some(("TLSv1_3".into(), "TLS13_AES_256_GCM_SHA384".into())),
            smtputf8: false,
            eight_bit: false,
            traceparent: String::new(),
            defaults: SenderDefaults::default(),
            not_before: 0,
            return_path: None,
        }
    }

    #[test]
    fn missing_message_id_and_date_are_added() {
        let id = QueueId::from_string("01TEST".into());
        let h = trace_headers(&sub("Subject: hi\r\n\r\nbody\r\n"), "mx.test", &id, 0);
        assert!(h.starts_with("Received: from client.test ([127.0.0.1])"));
        assert!(h.contains("with ESMTPSA id 01TEST"));
        assert!(h.contains("Message-ID: <01TEST@mx.test>\r\n"));
        assert!(h.contains("\r\nDate: "));
    }

    #[test]
    fn sender_defaults_are_added_where_absent() {
        let id = QueueId::from_string("01TEST".into());
        let mut s = sub("Reply-To: mine@example.test\r\nSubject: hi\r\n\r\nbody\r\n");
        s.defaults = SenderDefaults {
            reply_to: Some("support@example.test".into()),
            read_receipt_to: Some("receipts@example.test".into()),
            identification_header: None,
            unsubscribe_url: Some("https://u.example.test/{account}/{queue_id}".into()),
            hide_client_ip: true,
            footer: None,
        };
        let h = trace_headers(&s, "mx.test", &id, 0);
        assert!(h.contains("X-Herald-Account: default/app\r\n"));
        assert!(!h.contains("Reply-To"), "the message's own Reply-To wins");
        assert!(h.contains("Disposition-Notification-To: receipts@example.test\r\n"));
        assert!(h.contains("List-Unsubscribe: <https://u.example.test/default/app/01TEST>\r\n"));
        assert!(h.contains("List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"));
        assert!(h.starts_with("Received: from client.test\r\n"), "{h}");
        assert!(!h.contains("127.0.0.1"));
    }

    #[test]
    fn existing_message_id_and_date_are_kept() {
        let id = QueueId::from_string("01TEST".into());
        let body = "Message-ID: <x@y>\r\nDate: Sat, 28 Nov 2026 10:00:00 +0000\r\n\r\nbody\r\n";
        let h = trace_headers(&sub(body), "mx.test", &id, 0);
        assert!(!h.contains("Message-ID"));
        assert!(!h.contains("\r\nDate:"));
    }
}
