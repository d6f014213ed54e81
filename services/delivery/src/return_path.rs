//! The envelope sender a message leaves with. Mail whose MailDomain has a return-path host
//! (recorded by ingress in the entry) leaves with a VERP address under that host, so that
//! asynchronous bounces come back to Herald's inbound listener; everything else, and
//! Herald's own bounces (null sender), leaves with the sender as queued. The entry's
//! `sender` never changes: DSNs Herald writes itself still go to the app's address.

use herald_core::{config::BouncesConfig, envelope::QueueEntry, types::Domain, verp::Verp};

/// The address for `MAIL FROM:<...>` (empty for the null sender).
pub fn envelope_sender(bounces: &BouncesConfig, entry: &QueueEntry) -> String {
    if entry.sender.is_empty() || entry.return_path.is_empty() {
        return entry.sender.clone();
    }
    match Domain::parse(&entry.return_path) {
        Some(host) => Verp::new(bounces.secret.as_deref()).address(&entry.id, &host),
        // Ingress only records valid hosts; a damaged entry still goes out, unrewritten.
        None => {
            tracing::warn!(queue_id = %entry.id, return_path = %entry.return_path, "invalid return-path host; sending with the original sender");
            entry.sender.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(sender: &str, return_path: &str) -> QueueEntry {
        QueueEntry {
            id: "01JD5Z8Q4R6N3V2W1X0Y9Z8A7B".into(),
            sender: sender.into(),
            return_path: return_path.into(),
            ..Default::default()
        }
    }

    #[test]
    fn return_path_host_gives_a_tagged_verp_sender() {
        let bounces = BouncesConfig {
            secret: Some("a secret of some length".into()),
            ..Default::default()
        };
        let s = envelope_sender(&bounces, &entry("app@example.test", "bounces.example.test"));
        let (local, host) = s.rsplit_once('@').expect("address");
        assert_eq!(host, "bounces.example.test");
        let id = Verp::new(Some("a secret of some length"))
            .decode(local)
            .expect("decodes");
        assert_eq!(id.as_str(), "01JD5Z8Q4R6N3V2W1X0Y9Z8A7B");
    }

    #[test]
    fn without_a_secret_the_verp_sender_has_no_tag() {
        let s = envelope_sender(
            &BouncesConfig::default(),
            &entry("app@example.test", "bounces.example.test"),
        );
        assert_eq!(s, "b+01JD5Z8Q4R6N3V2W1X0Y9Z8A7B@bounces.example.test");
    }

    #[test]
    fn plain_senders_and_bounces_are_not_rewritten() {
        let bounces = BouncesConfig::default();
        assert_eq!(
            envelope_sender(&bounces, &entry("app@example.test", "")),
            "app@example.test"
        );
        assert_eq!(
            envelope_sender(&bounces, &entry("", "bounces.example.test")),
            ""
        );
    }
}
