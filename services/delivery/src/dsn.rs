//! Delivery status notifications (RFC 3464): the bounce a sender gets when mail to some
//! recipients failed for good. Built with mail-builder; sent through the normal queue with
//! the null sender, so a bounce never bounces.

// Classification lives in core, shared with ingress's inbound bounces; re-exported for
// the callers here.
pub use herald_core::bounce::{class_of, status_of};
use mail_builder::{
    MessageBuilder,
    headers::{content_type::ContentType, raw::Raw},
    mime::MimePart,
};

/// One failed recipient.
#[derive(Debug, Clone)]
pub struct Failed {
    pub recipient: String,
    /// RFC 3463 status, e.g. `5.1.1`, or `4.4.7` for a message that expired in the queue.
    pub status: String,
    /// The remote reply or the local reason.
    pub diagnostic: String,
    /// The MX host that gave the reply, when one did.
    pub remote_mta: String,
}

/// What a bounce reports.
pub struct Report<'a> {
    /// This MTA's name (`Reporting-MTA`).
    pub reporting_mta: &'a str,
    /// Domain the bounce comes from (`mailer-daemon@<domain>`): the sender's own MailDomain,
    /// so that the bounce is DKIM-aligned.
    pub from_domain: &'a str,
    /// The original envelope sender, who gets the bounce.
    pub to: &'a str,
    pub queue_id: &'a str,
    /// Unix seconds when the message was accepted.
    pub arrival: i64,
    pub now: i64,
    pub failed: &'a [Failed],
    /// The original message's header block (returned as text/rfc822-headers).
    pub original_headers: &'a [u8],
    /// A delay warning (`Action: delayed`, delivery goes on until this Unix time) rather
    /// than a failure report.
    pub delayed_until: Option<i64>,
}

fn rfc822_date(t: i64) -> String {
    mail_parser::DateTime::from_timestamp(t).to_rfc822()
}

/// The complete bounce message.
pub fn build(r: &Report<'_>) -> Vec<u8> {
    let mut human =
        String::from("This is the mail system at the relay that accepted your message.\r\n\r\n");
    match r.delayed_until {
        None => human
            .push_str("Your message could not be delivered to the following recipients:\r\n\r\n"),
        Some(until) => human.push_str(&format!(
            "Your message has not been delivered yet to the following recipients. This is \
             only a warning: delivery goes on until {}, and you need not send it again.\r\n\r\n",
            rfc822_date(until)
        )),
    }
    for f in r.failed {
        human.push_str(&format!("  <{}>: {}\r\n", f.recipient, f.diagnostic));
    }
    human.push_str(&format!(
        "\r\nQueue id: {}\r\nThe headers of your message are attached.\r\n",
        r.queue_id
    ));

    let mut status = format!(
        "Reporting-MTA: dns; {}\r\nX-Herald-Queue-ID: {}\r\nArrival-Date: {}\r\n",
        r.reporting_mta,
        r.queue_id,
        rfc822_date(r.arrival)
    );
    for f in r.failed {
        status.push_str(&format!(
            "\r\nFinal-Recipient: rfc822; {}\r\nAction: {}\r\nStatus: {}\r\n",
            f.recipient,
            if r.delayed_until.is_some() {
                "delayed"
            } else {
                "failed"
            },
            f.status
        ));
        if !f.remote_mta.is_empty() {
            status.push_str(&format!("Remote-MTA: dns; {}\r\n", f.remote_mta));
        }
        status.push_str(&format!(
            "Diagnostic-Code: smtp; {}\r\nLast-Attempt-Date: {}\r\n",
            f.diagnostic.replace(['\r', '\n'], " "),
            rfc822_date(r.now)
        ));
        if let Some(until) = r.delayed_until {
            status.push_str(&format!("Will-Retry-Until: {}\r\n", rfc822_date(until)));
        }
    }

    let report = MimePart::new(
        ContentType::new("multipart/report").attribute("report-type", "delivery-status"),
        vec![
            MimePart::new(
                ContentType::new("text/plain").attribute("charset", "utf-8"),
                human,
            ),
            // RFC 3464 2.1: delivery-status is 7bit text, never transfer-encoded.
            MimePart::new(ContentType::new("message/delivery-status"), status)
                .transfer_encoding("7bit"),
            MimePart::new(
                ContentType::new("text/rfc822-headers").attribute("charset", "utf-8"),
                String::from_utf8_lossy(r.original_headers).into_owned(),
            ),
        ],
    );
    MessageBuilder::new()
        .from((
            "Mail Delivery System".to_string(),
            format!("mailer-daemon@{}", r.from_domain),
        ))
        .to(r.to)
        .subject(if r.delayed_until.is_some() {
            "Delayed Mail (still being retried)"
        } else {
            "Undelivered Mail Returned to Sender"
        })
        .date(r.now)
        .message_id(format!("{}.bounce@{}", r.queue_id, r.reporting_mta))
        .header("Auto-Submitted", Raw::new("auto-replied"))
        .body(report)
        .write_to_vec()
        .unwrap_or_default()
}

/// The header block of a message (everything before the first empty line).
pub fn header_block(message: &[u8]) -> &[u8] {
    let end = message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 2)
        .unwrap_or(message.len());
    &message[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use mail_parser::MessageParser;

    #[test]
    fn bounce_is_a_parseable_rfc3464_report() {
        let failed = [Failed {
            recipient: "reject@other.test".into(),
            status: "5.1.1".into(),
            diagnostic: "550 5.1.1 No such user".into(),
            remote_mta: "mx1.other.test".into(),
        }];
        let raw = build(&Report {
            reporting_mta: "mta.herald.test",
            from_domain: "example.test",
            to: "sender@example.test",
            queue_id: "01QUEUE",
            arrival: 1_795_000_000,
            now: 1_795_000_100,
            failed: &failed,
            original_headers: b"From: sender@example.test\r\nSubject: hello\r\n\r\n",
            delayed_until: None,
        });
        let text = String::from_utf8_lossy(&raw);
        let msg = MessageParser::new().parse(&raw).expect("parses");
        let root = msg.root_part();
        assert!(root.is_content_type("multipart", "report"), "{text}");
        assert_eq!(
            root.content_type().and_then(|c| c.attribute("report-type")),
            Some("delivery-status")
        );
        let kids: Vec<_> = root.children().collect();
        assert_eq!(kids.len(), 3);
        assert!(kids[1].is_content_type("message", "delivery-status"));
        let status = String::from_utf8_lossy(kids[1].raw_body()).to_string();
        assert!(
            status.contains("Final-Recipient: rfc822; reject@other.test"),
            "{status}"
        );
        assert!(status.contains("Status: 5.1.1"));
        assert!(status.contains("Diagnostic-Code: smtp; 550 5.1.1 No such user"));
        assert!(status.contains("Remote-MTA: dns; mx1.other.test"));
        assert!(text.contains("Auto-Submitted: auto-replied"));
        assert!(text.contains("Subject: hello"), "original headers returned");
    }

    #[test]
    fn a_delay_warning_says_delayed_and_until_when() {
        let deferred = [Failed {
            recipient: "slow@other.test".into(),
            status: "4.2.1".into(),
            diagnostic: "450 4.2.1 Mailbox busy".into(),
            remote_mta: "mx1.other.test".into(),
        }];
        let raw = build(&Report {
            reporting_mta: "mta.herald.test",
            from_domain: "example.test",
            to: "sender@example.test",
            queue_id: "01QUEUE",
            arrival: 1_795_000_000,
            now: 1_795_014_400,
            failed: &deferred,
            original_headers: b"Subject: hello\r\n\r\n",
            delayed_until: Some(1_795_432_000),
        });
        let msg = MessageParser::new().parse(&raw).expect("parses");
        assert_eq!(msg.subject(), Some("Delayed Mail (still being retried)"));
        let kids: Vec<_> = msg.root_part().children().collect();
        let status = String::from_utf8_lossy(kids[1].raw_body()).to_string();
        assert!(status.contains("Action: delayed"), "{status}");
        assert!(status.contains("Status: 4.2.1"), "{status}");
        assert!(status.contains("Will-Retry-Until: "), "{status}");
        assert!(!status.contains("Action: failed"));
    }
}
