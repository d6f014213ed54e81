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

/// Bounce class recorded in events: `hard` (the address or domain does not exist, or the
/// mailbox is disabled), `policy` (refused for content, sender or reputation), `expired`,
/// or `permanent`.
pub fn class_of(status: &str) -> &'static str {
    if status.starts_with("5.1.") || status == "5.2.1" {
        "hard"
    } else if status.starts_with("5.7.") {
        "policy"
    } else if status == "4.4.7" {
        "expired"
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
