//! Delivery status notifications (RFC 3464) that come back to a return-path address: the
//! `multipart/report; report-type=delivery-status` structure is read with mail-parser, and
//! so is each block of the `message/delivery-status` body (RFC 3464 2.1: a per-message
//! block, then one block per recipient, each a header block ending at a blank line).

use mail_parser::{HeaderForm, Headers, MessageParser};

/// What a remote MTA did with one recipient (`Action:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Failed,
    Delayed,
    Delivered,
    Relayed,
    Expanded,
    Unknown,
}

impl Action {
    fn parse(value: &str) -> Action {
        let word = value.split_whitespace().next().unwrap_or_default();
        match word.to_ascii_lowercase().as_str() {
            "failed" => Action::Failed,
            "delayed" => Action::Delayed,
            "delivered" => Action::Delivered,
            "relayed" => Action::Relayed,
            "expanded" => Action::Expanded,
            _ => Action::Unknown,
        }
    }
}

/// One per-recipient block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientReport {
    /// `Final-Recipient`, the address type (`rfc822;`) removed.
    pub final_recipient: String,
    /// `Original-Recipient` (the ORCPT), when given.
    pub original_recipient: Option<String>,
    pub action: Action,
    /// `Status` when it is a valid RFC 3463 code.
    pub status: Option<String>,
    /// `Remote-MTA`, the type removed.
    pub remote_mta: Option<String>,
    /// `Diagnostic-Code`, the type removed (`550 5.1.1 ...` for `smtp;`).
    pub diagnostic: Option<String>,
}

/// A parsed delivery status notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryReport {
    /// `Reporting-MTA`, the type removed; empty when absent.
    pub reporting_mta: String,
    pub recipients: Vec<RecipientReport>,
}

/// The delivery report in `message`, or `None` when it is not one (an auto-reply, a
/// challenge, a human's answer).
pub fn parse(message: &[u8]) -> Option<DeliveryReport> {
    let parsed = MessageParser::new().parse(message)?;
    let root = parsed.root_part();
    let report_type = root.content_type()?.attribute("report-type")?;
    if !root.is_content_type("multipart", "report")
        || !(report_type.eq_ignore_ascii_case("delivery-status")
            || report_type.eq_ignore_ascii_case("global-delivery-status"))
    {
        return None;
    }
    let status = root.children().find(|p| {
        p.is_content_type("message", "delivery-status")
            || p.is_content_type("message", "global-delivery-status")
    })?;
    parse_status(&status.decoded())
}

/// The body of a `message/delivery-status` part.
pub fn parse_status(body: &[u8]) -> Option<DeliveryReport> {
    // Unknown fields as unfolded text, which every DSN field is.
    let parser = MessageParser::new().unknown_headers(HeaderForm::Text);
    let mut report = DeliveryReport {
        reporting_mta: String::new(),
        recipients: Vec::new(),
    };
    let mut rest = body;
    loop {
        // Blocks may be separated by more than one blank line.
        let start = rest
            .iter()
            .position(|b| !matches!(b, b'\r' | b'\n' | b' ' | b'\t'))
            .unwrap_or(rest.len());
        rest = &rest[start..];
        if rest.is_empty() {
            break;
        }
        let block = parser.parse_headers(rest)?;
        let headers = block.headers();
        if headers.is_empty() {
            break;
        }
        if let Some(mta) = field(&headers, "Reporting-MTA") {
            report.reporting_mta = without_type(&mta);
        }
        let final_recipient = field(&headers, "Final-Recipient").map(|v| address(&v));
        let original_recipient = field(&headers, "Original-Recipient").map(|v| address(&v));
        if let Some(final_recipient) = final_recipient.or(original_recipient.clone()) {
            report.recipients.push(RecipientReport {
                final_recipient,
                original_recipient,
                action: field(&headers, "Action")
                    .map(|a| Action::parse(&a))
                    .unwrap_or(Action::Unknown),
                status: field(&headers, "Status")
                    .and_then(|s| s.split_whitespace().next().map(str::to_string))
                    .filter(|s| herald_core::bounce::is_status(s)),
                remote_mta: field(&headers, "Remote-MTA").map(|v| without_type(&v)),
                diagnostic: field(&headers, "Diagnostic-Code").map(|v| without_type(&v)),
            });
        }
        // The next block starts after the blank line that ended this one.
        let next = block.root_part().offset_body() as usize;
        if next == 0 || next >= rest.len() {
            break;
        }
        rest = &rest[next..];
    }
    (!report.recipients.is_empty()).then_some(report)
}

fn field(headers: &Headers<'_>, name: &str) -> Option<String> {
    let value = headers.get(name)?.value();
    let text = value.as_text()?.trim();
    (!text.is_empty()).then(|| text.to_string())
}

/// `type; value` -> `value` (RFC 3464 address-type, mta-name-type, diagnostic-type).
fn without_type(value: &str) -> String {
    match value.split_once(';') {
        Some((_, v)) => v.trim().to_string(),
        None => value.trim().to_string(),
    }
}

/// An address field's address: type removed, angle brackets too (some MTAs add them).
fn address(value: &str) -> String {
    without_type(value)
        .trim_start_matches('<')
        .trim_end_matches('>')
        .trim()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bounce as Postfix 3.7's bounce(8) writes it for an unknown user.
    const POSTFIX_DSN: &str = "Return-Path: <>\r
Received: by dest.mx.test (Postfix)\r
\tid 4Xy1Zq0Kz3z9sQ; Sat, 28 Nov 2026 10:00:01 +0000 (UTC)\r
Date: Sat, 28 Nov 2026 10:00:01 +0000 (UTC)\r
From: MAILER-DAEMON@dest.mx.test (Mail Delivery System)\r
Subject: Undelivered Mail Returned to Sender\r
To: b+01JD5Z8Q4R6N3V2W1X0Y9Z8A7B-0123456789@bounces.example.test\r
Auto-Submitted: auto-replied\r
MIME-Version: 1.0\r
Content-Type: multipart/report; report-type=delivery-status;\r
\tboundary=\"4Xy1Zq0Kz3z9sQ.1795860001/dest.mx.test\"\r
Content-Transfer-Encoding: 8bit\r
Message-Id: <20261128100001.4Xy1Zq0Kz3z9sQ@dest.mx.test>\r
\r
This is a MIME-encapsulated message.\r
\r
--4Xy1Zq0Kz3z9sQ.1795860001/dest.mx.test\r
Content-Description: Notification\r
Content-Type: text/plain; charset=us-ascii\r
\r
This is the mail system at host dest.mx.test.\r
\r
I'm sorry to have to inform you that your message could not\r
be delivered to one or more recipients.\r
\r
<ghost@dest.test>: No such user here\r
\r
--4Xy1Zq0Kz3z9sQ.1795860001/dest.mx.test\r
Content-Description: Delivery report\r
Content-Type: message/delivery-status\r
\r
Reporting-MTA: dns; dest.mx.test\r
X-Postfix-Queue-ID: 4Xy1Zq0Kz3z9sQ\r
X-Postfix-Sender: rfc822;\r
    b+01JD5Z8Q4R6N3V2W1X0Y9Z8A7B-0123456789@bounces.example.test\r
Arrival-Date: Sat, 28 Nov 2026 10:00:00 +0000 (UTC)\r
\r
Final-Recipient: rfc822; ghost@dest.test\r
Original-Recipient: rfc822;ghost@dest.test\r
Action: failed\r
Status: 5.1.1\r
Diagnostic-Code: X-Postfix; No such user here\r
\r
--4Xy1Zq0Kz3z9sQ.1795860001/dest.mx.test\r
Content-Description: Undelivered Message\r
Content-Type: message/rfc822\r
Content-Transfer-Encoding: 8bit\r
\r
Return-Path: <b+01JD5Z8Q4R6N3V2W1X0Y9Z8A7B-0123456789@bounces.example.test>\r
From: app@example.test\r
To: ghost@dest.test\r
Subject: hello\r
\r
hello\r
\r
--4Xy1Zq0Kz3z9sQ.1795860001/dest.mx.test--\r
";

    #[test]
    fn postfix_bounce_for_an_unknown_user() {
        let report = parse(POSTFIX_DSN.as_bytes()).expect("a delivery report");
        assert_eq!(report.reporting_mta, "dest.mx.test");
        assert_eq!(
            report.recipients,
            vec![RecipientReport {
                final_recipient: "ghost@dest.test".into(),
                original_recipient: Some("ghost@dest.test".into()),
                action: Action::Failed,
                status: Some("5.1.1".into()),
                remote_mta: None,
                diagnostic: Some("No such user here".into()),
            }]
        );
    }

    #[test]
    fn minimal_report_with_two_recipients_and_bare_line_feeds() {
        let dsn = "From: mailer-daemon@mx.other.test\n\
Content-Type: multipart/report; report-type=\"Delivery-Status\"; boundary=b\n\
\n\
--b\n\
Content-Type: text/plain\n\
\n\
failed\n\
--b\n\
Content-Type: message/delivery-status\n\
\n\
Reporting-MTA: dns;mx.other.test\n\
\n\
\n\
Final-Recipient: rfc822;<Full@Other.test>\n\
Action: failed\n\
Status: 5.2.2 (mailbox full)\n\
Remote-MTA: dns; in.other.test\n\
Diagnostic-Code: smtp; 552 5.2.2 Mailbox full\n\
\n\
Final-Recipient: rfc822; slow@other.test\n\
Action: delayed\n\
Status: 4.4.1\n\
--b--\n";
        let report = parse(dsn.as_bytes()).expect("a delivery report");
        assert_eq!(report.reporting_mta, "mx.other.test");
        assert_eq!(report.recipients.len(), 2);
        let full = &report.recipients[0];
        assert_eq!(full.final_recipient, "Full@Other.test");
        assert_eq!(full.original_recipient, None);
        assert_eq!(full.action, Action::Failed);
        assert_eq!(full.status.as_deref(), Some("5.2.2"));
        assert_eq!(full.remote_mta.as_deref(), Some("in.other.test"));
        assert_eq!(full.diagnostic.as_deref(), Some("552 5.2.2 Mailbox full"));
        let slow = &report.recipients[1];
        assert_eq!(slow.final_recipient, "slow@other.test");
        assert_eq!(slow.action, Action::Delayed);
        assert_eq!(slow.status.as_deref(), Some("4.4.1"));
        assert_eq!(slow.diagnostic, None);
    }

    #[test]
    fn folded_fields_and_a_base64_status_part_are_read() {
        let status = "Reporting-MTA: dns; mx.other.test\r\n\r\nFinal-Recipient: rfc822;\r\n a@other.test\r\nAction: failed\r\nStatus: 5.1.1\r\n";
        let dsn = format!(
            "Content-Type: multipart/report; report-type=delivery-status; boundary=x\r\n\r\n\
             --x\r\nContent-Type: message/delivery-status\r\nContent-Transfer-Encoding: base64\r\n\r\n{}\r\n--x--\r\n",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, status)
        );
        let report = parse(dsn.as_bytes()).expect("a delivery report");
        assert_eq!(report.recipients[0].final_recipient, "a@other.test");
        assert_eq!(report.recipients[0].status.as_deref(), Some("5.1.1"));
    }

    #[test]
    fn auto_replies_and_other_reports_are_not_delivery_reports() {
        let vacation = "From: ghost@dest.test\r\nSubject: Out of office\r\nAuto-Submitted: auto-replied\r\n\r\nBack on Monday.\r\n";
        assert_eq!(parse(vacation.as_bytes()), None);
        let mdn = "Content-Type: multipart/report; report-type=disposition-notification; boundary=x\r\n\r\n\
                   --x\r\nContent-Type: message/disposition-notification\r\n\r\nFinal-Recipient: rfc822; a@b.test\r\nDisposition: manual-action/MDN-sent-manually; displayed\r\n--x--\r\n";
        assert_eq!(parse(mdn.as_bytes()), None);
        let empty = "Content-Type: multipart/report; report-type=delivery-status; boundary=x\r\n\r\n\
                     --x\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; a.test\r\n--x--\r\n";
        assert_eq!(parse(empty.as_bytes()), None, "no recipient block");
        assert_eq!(parse(b""), None);
    }
}
