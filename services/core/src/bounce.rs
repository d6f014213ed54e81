//! How a failure is classified: the RFC 3463 status of a reply and the bounce class events
//! carry. One classification for the bounces delivery sees itself (a 5xx at RCPT) and the
//! ones that come back later as reports (ingress's inbound listener).

/// True for an RFC 3463 status code: `class.subject.detail`, digits only.
pub fn is_status(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
}

/// RFC 3463 status for a failure text that starts with a reply (`550 5.1.1 ...`) or an
/// enhanced code (`5.1.2 ...`); `5.0.0` when there is none.
pub fn status_of(diagnostic: &str) -> String {
    diagnostic
        .split_whitespace()
        .take(2)
        .find(|w| is_status(w))
        .map(str::to_string)
        .unwrap_or_else(|| "5.0.0".into())
}

/// Bounce class recorded in events, from the status alone: see [`classify`].
pub fn class_of(status: &str) -> &'static str {
    classify(status, "")
}

/// Words mailbox providers use when they refuse a sender for its reputation rather than
/// for this message (Gmail "unsolicited", Microsoft "blocked using Spamhaus", RBL names).
const REPUTATION_WORDS: &[&str] = &[
    "reputation",
    "spam",
    "unsolicited",
    "blocklist",
    "blacklist",
    "block list",
    "blocked",
    "listed",
    "rbl",
    "dnsbl",
    "spamhaus",
    "barracuda",
];

/// Bounce class recorded in events:
/// - `hard`: the address or domain does not exist or is disabled (5.1.x, 5.2.1): suppressed;
/// - `reputation`: refused for the sending IP's or domain's standing (5.7.x / 4.7.x with
///   words like "spam", "blocked", "listed");
/// - `policy`: any other 5.7.x refusal (content, authentication, sender);
/// - `soft`: a condition of the mailbox that may pass (4.x.x made final, 5.2.2 mailbox
///   full, 5.2.3 message too large for it);
/// - `expired`: still undelivered when the queue lifetime ran out (4.4.7);
/// - `permanent`: anything else final.
pub fn classify(status: &str, text: &str) -> &'static str {
    let text = text.to_ascii_lowercase();
    let reputation = || REPUTATION_WORDS.iter().any(|w| text.contains(w));
    if status == "4.4.7" {
        "expired"
    } else if status.starts_with("5.1.") || status == "5.2.1" {
        "hard"
    } else if (status.starts_with("5.7.") || status.starts_with("4.7.")) && reputation() {
        "reputation"
    } else if status.starts_with("5.7.") {
        "policy"
    } else if status.starts_with('4') || status == "5.2.2" || status == "5.2.3" {
        "soft"
    } else {
        "permanent"
    }
}

/// Hard bounces put the address on the account's suppression list.
pub fn suppresses(class: &str) -> bool {
    class == "hard"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_class_come_from_the_reply() {
        assert_eq!(status_of("550 5.1.1 No such user"), "5.1.1");
        assert_eq!(
            status_of("5.1.2 recipient domain x does not exist"),
            "5.1.2"
        );
        assert_eq!(status_of("554 Transaction failed"), "5.0.0");
        assert_eq!(class_of("5.1.1"), "hard");
        assert_eq!(class_of("5.2.1"), "hard");
        assert_eq!(class_of("5.7.1"), "policy");
        assert_eq!(class_of("4.4.7"), "expired");
        assert_eq!(class_of("5.3.4"), "permanent");
        assert_eq!(
            classify(
                "5.7.1",
                "550 5.7.1 Service unavailable; client host blocked using Spamhaus"
            ),
            "reputation"
        );
        assert_eq!(
            classify(
                "4.7.28",
                "421 4.7.28 unusual rate of unsolicited mail from your IP"
            ),
            "reputation"
        );
        assert_eq!(
            classify("5.7.1", "550 5.7.1 DMARC policy violation"),
            "policy"
        );
        assert_eq!(classify("5.2.2", "552 5.2.2 Mailbox full"), "soft");
        assert_eq!(
            classify("4.2.1", "450 4.2.1 busy (made final by a rule)"),
            "soft"
        );
        assert!(suppresses(class_of("5.1.1")));
        assert!(!suppresses(class_of("5.2.2")));
    }

    #[test]
    fn status_syntax() {
        assert!(is_status("5.1.1"));
        assert!(is_status("4.4.7"));
        assert!(!is_status("5.1"));
        assert!(!is_status("5.1.x"));
        assert!(!is_status("550"));
    }
}
