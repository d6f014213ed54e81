//! Every reply ingress gives, in one place: code, enhanced status code (RFC 3463) and text.

use std::fmt;

/// One SMTP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub esc: &'static str,
    pub text: String,
}

impl Reply {
    fn new(code: u16, esc: &'static str, text: impl Into<String>) -> Reply {
        Reply {
            code,
            esc,
            text: text.into(),
        }
    }

    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    pub fn ok() -> Reply {
        Reply::new(250, "2.0.0", "Ok")
    }
    pub fn sender_ok(sender: &str) -> Reply {
        Reply::new(250, "2.1.0", format!("Sender <{sender}> ok"))
    }
    pub fn recipient_ok(rcpt: &str) -> Reply {
        Reply::new(250, "2.1.5", format!("Recipient <{rcpt}> ok"))
    }
    pub fn start_data() -> Reply {
        Reply::new(354, "", "End data with <CR><LF>.<CR><LF>")
    }
    pub fn queued(id: &str) -> Reply {
        Reply::new(250, "2.0.0", format!("Ok: queued as {id}"))
    }
    pub fn report_processed() -> Reply {
        Reply::new(250, "2.0.0", "Ok: delivery report processed")
    }
    pub fn returned_message_accepted() -> Reply {
        Reply::new(250, "2.0.0", "Ok: message accepted")
    }
    pub fn queued_held(id: &str, until: &str) -> Reply {
        Reply::new(
            250,
            "2.0.0",
            format!("Ok: queued as {id}; held until {until} UTC by the hourly limit"),
        )
    }
    pub fn hourly_limit(limit: u64, account: &str, retry_after: &str) -> Reply {
        Reply::new(
            451,
            "4.7.1",
            format!(
                "Hourly limit of {limit} messages reached for account {account}; retry after {retry_after} UTC"
            ),
        )
    }
    pub fn limits_unavailable() -> Reply {
        Reply::new(
            451,
            "4.3.0",
            "Sending limits cannot be checked right now; try again later",
        )
    }
    pub fn bye() -> Reply {
        Reply::new(221, "2.0.0", "Bye")
    }
    pub fn ready_for_tls() -> Reply {
        Reply::new(220, "2.0.0", "Ready to start TLS")
    }
    pub fn auth_ok() -> Reply {
        Reply::new(235, "2.7.0", "Authentication successful")
    }
    pub fn vrfy() -> Reply {
        Reply::new(
            252,
            "2.5.0",
            "Cannot VRFY user, but will accept message and attempt delivery",
        )
    }
    pub fn help() -> Reply {
        Reply::new(214, "2.0.0", "See https://www.rfc-editor.org/rfc/rfc5321")
    }

    // 4xx: try again later.
    pub fn shutting_down(hostname: &str) -> Reply {
        Reply::new(
            421,
            "4.3.2",
            format!("{hostname} Service shutting down, try again later"),
        )
    }
    pub fn timeout(hostname: &str) -> Reply {
        Reply::new(
            421,
            "4.4.2",
            format!("{hostname} Timeout waiting for client, closing connection"),
        )
    }
    pub fn too_many_errors() -> Reply {
        Reply::new(421, "4.7.0", "Too many errors, closing connection")
    }
    pub fn queue_unavailable() -> Reply {
        Reply::new(
            451,
            "4.3.0",
            "Queue temporarily unavailable, message not accepted; try again later",
        )
    }
    pub fn tls_unavailable() -> Reply {
        Reply::new(454, "4.7.0", "TLS not available")
    }
    pub fn too_many_recipients(max: usize) -> Reply {
        Reply::new(
            452,
            "4.5.3",
            format!("Too many recipients (at most {max} per message)"),
        )
    }
    pub fn return_paths_unavailable() -> Reply {
        Reply::new(
            451,
            "4.3.0",
            "Bounce records temporarily unavailable; try again later",
        )
    }
    pub fn resources_unavailable() -> Reply {
        Reply::new(
            451,
            "4.3.0",
            "Account data temporarily unavailable; try again later",
        )
    }

    // 5xx: refused.
    pub fn unknown_command() -> Reply {
        Reply::new(500, "5.5.1", "Unknown command")
    }
    pub fn line_too_long() -> Reply {
        Reply::new(500, "5.5.2", "Line too long")
    }
    pub fn syntax(usage: &str) -> Reply {
        Reply::new(501, "5.5.4", format!("Syntax: {usage}"))
    }
    pub fn bad_sender_syntax() -> Reply {
        Reply::new(501, "5.1.7", "Bad sender address syntax")
    }
    pub fn bad_recipient_syntax() -> Reply {
        Reply::new(501, "5.1.3", "Bad recipient address syntax")
    }
    pub fn invalid_parameter(param: &str) -> Reply {
        Reply::new(501, "5.5.4", format!("Invalid parameter {param}"))
    }
    pub fn unsupported_parameter(param: &str) -> Reply {
        Reply::new(504, "5.5.4", format!("Unsupported parameter {param}"))
    }
    pub fn not_implemented() -> Reply {
        Reply::new(502, "5.5.1", "Command not implemented")
    }
    pub fn need_helo() -> Reply {
        Reply::new(503, "5.5.1", "Send EHLO or HELO first")
    }
    pub fn nested_mail() -> Reply {
        Reply::new(503, "5.5.1", "Sender already given; RSET to start over")
    }
    pub fn need_mail() -> Reply {
        Reply::new(503, "5.5.1", "Need MAIL command first")
    }
    pub fn need_rcpt() -> Reply {
        Reply::new(503, "5.5.1", "Need RCPT command first")
    }
    pub fn already_tls() -> Reply {
        Reply::new(503, "5.5.1", "TLS already active")
    }
    pub fn already_authenticated() -> Reply {
        Reply::new(503, "5.5.1", "Already authenticated")
    }
    pub fn auth_in_transaction() -> Reply {
        Reply::new(503, "5.5.1", "AUTH not allowed during a mail transaction")
    }
    pub fn unsupported_mechanism() -> Reply {
        Reply::new(
            504,
            "5.5.4",
            "Unrecognized authentication type; use PLAIN or LOGIN",
        )
    }
    pub fn auth_cancelled() -> Reply {
        Reply::new(501, "5.0.0", "Authentication cancelled")
    }
    pub fn auth_malformed() -> Reply {
        Reply::new(501, "5.5.2", "Malformed authentication response")
    }
    pub fn auth_required() -> Reply {
        Reply::new(530, "5.7.0", "Authentication required")
    }
    pub fn bad_credentials() -> Reply {
        Reply::new(535, "5.7.8", "Authentication credentials invalid")
    }
    pub fn encryption_required() -> Reply {
        Reply::new(
            538,
            "5.7.11",
            "Encryption required for requested authentication mechanism",
        )
    }
    pub fn message_too_big(max: usize) -> Reply {
        Reply::new(
            552,
            "5.3.4",
            format!("Message size exceeds fixed maximum message size of {max} octets"),
        )
    }
    pub fn sender_domain_not_allowed(domain: &str) -> Reply {
        Reply::new(
            550,
            "5.7.1",
            format!("Sender domain {domain} is not allowed for this account"),
        )
    }
    pub fn sender_domain_not_verified(domain: &str, reason: &str) -> Reply {
        Reply::new(
            550,
            "5.7.1",
            format!("Sender domain {domain} is not verified: {reason}"),
        )
    }
    pub fn null_sender_refused() -> Reply {
        Reply::new(550, "5.7.1", "Null sender is not accepted for submission")
    }
    pub fn utf8_needs_smtputf8() -> Reply {
        Reply::new(
            553,
            "5.6.7",
            "Address needs SMTPUTF8; declare it on MAIL FROM",
        )
    }
    pub fn line_too_long_in_message(max: usize) -> Reply {
        Reply::new(
            550,
            "5.5.2",
            format!("Message has a line longer than {max} octets (RFC 5322 2.1.1)"),
        )
    }
    pub fn bare_line_ending() -> Reply {
        Reply::new(
            550,
            "5.5.2",
            "Message contains a bare CR or LF; lines must end with CRLF",
        )
    }
    pub fn no_from_header() -> Reply {
        Reply::new(550, "5.6.0", "Message has no From header (RFC 5322 3.6)")
    }
    pub fn bad_from_header(address: &str) -> Reply {
        Reply::new(
            550,
            "5.6.0",
            format!("From header address {address} is not valid"),
        )
    }
    pub fn from_domain_not_allowed(domain: &str) -> Reply {
        Reply::new(
            550,
            "5.7.1",
            format!("From header domain {domain} is not allowed"),
        )
    }
    pub fn suppressed(rcpt: &str) -> Reply {
        Reply::new(
            550,
            "5.1.1",
            format!("Recipient <{rcpt}> is on the suppression list"),
        )
    }
    pub fn relay_denied() -> Reply {
        Reply::new(554, "5.7.1", "Relay access denied")
    }
    pub fn unknown_recipient(rcpt: &str) -> Reply {
        Reply::new(550, "5.1.1", format!("Recipient <{rcpt}> unknown"))
    }
    pub fn auth_not_offered() -> Reply {
        Reply::new(503, "5.5.1", "AUTH is not offered on this listener")
    }
    pub fn too_many_connections_from(ip: &str) -> Reply {
        Reply::new(421, "4.7.0", format!("Too many connections from {ip}"))
    }
    pub fn too_many_connections() -> Reply {
        Reply::new(421, "4.7.0", "Too many connections, try again later")
    }
    pub fn auth_blocked(ip: &str) -> Reply {
        Reply::new(
            421,
            "4.7.0",
            format!("Too many failed authentications from {ip}; try again later"),
        )
    }
    pub fn eight_bit_needs_declaration() -> Reply {
        Reply::new(
            554,
            "5.6.0",
            "Message contains 8-bit data; declare BODY=8BITMIME or SMTPUTF8",
        )
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.esc.is_empty() {
            write!(f, "{} {}", self.code, self.text)
        } else {
            write!(f, "{} {} {}", self.code, self.esc, self.text)
        }
    }
}

/// The reply to a line smtp-proto could not parse.
pub fn for_parse_error(e: &smtp_proto::Error) -> Reply {
    match e {
        smtp_proto::Error::UnknownCommand => Reply::unknown_command(),
        smtp_proto::Error::InvalidSenderAddress => Reply::bad_sender_syntax(),
        smtp_proto::Error::InvalidRecipientAddress => Reply::bad_recipient_syntax(),
        smtp_proto::Error::SyntaxError { syntax } => Reply::syntax(syntax),
        smtp_proto::Error::InvalidParameter { param } => Reply::invalid_parameter(param),
        smtp_proto::Error::UnsupportedParameter { param } => Reply::unsupported_parameter(param),
        smtp_proto::Error::ResponseTooLong => Reply::line_too_long(),
        smtp_proto::Error::NeedsMoreData { .. } | smtp_proto::Error::InvalidResponse { .. } => {
            Reply::syntax("command")
        }
    }
}
