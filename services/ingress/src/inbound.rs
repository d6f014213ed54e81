//! The inbound listener: bounces coming back to return-path (VERP) addresses.
//!
//! A listener marked `inbound` is the MX of the MailDomains' return-path hosts. It takes
//! mail without authentication, but only for `b+<queue id>-<tag>@<return-path host>` whose
//! tag verifies and whose message Herald recorded ([`ReturnPathRecord`]); any other domain
//! is a relay attempt (`554 5.7.1`), any other local part unknown (`550 5.1.1`). A delivery
//! report (RFC 3464) becomes `bounced` / `deferred` events for the original message, and
//! hard bounces go on its account's suppression list. Anything else (auto-replies) is
//! accepted and dropped. Nothing received here is ever queued, so nothing here can bounce.

use herald_core::{
    bounce,
    envelope::{Event, EventKind},
    return_path::ReturnPathRecord,
    types::{Mailbox, QueueId},
};
use tracing::{info, warn};

use crate::{
    reply::Reply,
    report::{self, Action, DeliveryReport, RecipientReport},
    session::SessionContext,
};

/// An accepted inbound recipient: the message its return-path address stands for.
#[derive(Debug, Clone)]
pub struct Returned {
    pub address: String,
    pub queue_id: QueueId,
    pub record: ReturnPathRecord,
}

/// What one inbound message changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Processed {
    /// It was a delivery report.
    pub report: bool,
    pub bounced: usize,
    pub deferred: usize,
    pub suppressed: usize,
    /// Blocks about addresses the message was not sent to, or with nothing to record.
    pub ignored: usize,
}

/// Decides one RCPT on the inbound listener.
pub async fn recipient(ctx: &SessionContext, rcpt: &Mailbox) -> Result<Returned, Reply> {
    let address = rcpt.to_string();
    if !ctx.resources.current().is_return_path_host(rcpt.domain()) {
        ctx.metrics.refused("relay_denied");
        info!(rcpt = %address, "relay attempt on the inbound listener refused");
        return Err(Reply::relay_denied());
    }
    let queue_id = match ctx.verp.decode(rcpt.local()) {
        Ok(id) => id,
        Err(e) => {
            ctx.metrics.refused("unknown_return_path");
            info!(rcpt = %address, reason = %e, "not a return-path address of ours");
            return Err(Reply::unknown_recipient(&address));
        }
    };
    match ctx.return_paths.get(queue_id.as_str()).await {
        Ok(Some(record)) => Ok(Returned {
            address,
            queue_id,
            record,
        }),
        Ok(None) => {
            ctx.metrics.refused("unknown_return_path");
            info!(rcpt = %address, queue_id = %queue_id, "no record of this message (expired or never sent)");
            Err(Reply::unknown_recipient(&address))
        }
        Err(e) => {
            warn!(error = %e, queue_id = %queue_id, "return-path record unavailable");
            Err(Reply::return_paths_unavailable())
        }
    }
}

/// One outcome to record for the original message.
struct Finding {
    event: Event,
    /// (recipient, reason) when the address is to be suppressed.
    suppress: Option<(String, String)>,
}

/// Turns the report about `returned`'s message into events and suppressions. Only blocks
/// about the message's own recipients count: the return path is no secret to them.
fn findings(returned: &Returned, report: &DeliveryReport, now: i64) -> (Vec<Finding>, usize) {
    let record = &returned.record;
    let mut out = Vec::new();
    let mut ignored = 0;
    for block in &report.recipients {
        let kind = match block.action {
            Action::Failed => EventKind::Bounced,
            Action::Delayed => EventKind::Deferred,
            // Delivered, relayed, expanded: a success report; nothing to record.
            _ => {
                ignored += 1;
                continue;
            }
        };
        let Some(rcpt) = original_recipient(record, block) else {
            warn!(queue_id = %returned.queue_id, final_recipient = %block.final_recipient, "report about an address the message was not sent to: ignored");
            ignored += 1;
            continue;
        };
        let default_status = if kind == EventKind::Bounced {
            "5.0.0"
        } else {
            "4.0.0"
        };
        let status = block
            .status
            .clone()
            .or_else(|| {
                block
                    .diagnostic
                    .as_deref()
                    .map(bounce::status_of)
                    .filter(|s| s != "5.0.0")
            })
            .unwrap_or_else(|| default_status.to_string());
        let diagnostic = block.diagnostic.clone().unwrap_or_default();
        let class = if kind == EventKind::Bounced {
            bounce::classify(&status, &diagnostic)
        } else {
            ""
        };
        let reply_code = diagnostic
            .get(..3)
            .filter(|c| c.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let reply_text = if diagnostic.is_empty() {
            format!("{status} reported by {}", report.reporting_mta)
        } else {
            diagnostic.clone()
        };
        let suppress = bounce::suppresses(class).then(|| {
            (
                rcpt.to_string(),
                format!(
                    "{status} {reply_text} (bounce report from {})",
                    report.reporting_mta
                ),
            )
        });
        out.push(Finding {
            event: Event {
                kind: kind as i32,
                queue_id: returned.queue_id.to_string(),
                account: record.account.clone(),
                sender: record.sender.clone(),
                recipients: vec![rcpt.to_string()],
                domain: rcpt
                    .rsplit_once('@')
                    .map(|(_, d)| d.to_string())
                    .unwrap_or_default(),
                remote_host: block
                    .remote_mta
                    .clone()
                    .unwrap_or_else(|| report.reporting_mta.clone()),
                reply_code,
                enhanced_code: status,
                reply_text,
                at: now,
                message_id: record.message_id.clone(),
                bounce_class: class.to_string(),
                ..Default::default()
            },
            suppress,
        });
    }
    (out, ignored)
}

/// The recipient of the message a block is about: its ORCPT when given, else the final
/// recipient.
fn original_recipient<'r>(
    record: &'r ReturnPathRecord,
    block: &RecipientReport,
) -> Option<&'r str> {
    block
        .original_recipient
        .as_deref()
        .and_then(|a| record.recipient(a))
        .or_else(|| record.recipient(&block.final_recipient))
}

/// Processes one message received for `returned` (every recipient of the transaction).
/// Suppressions are written before the events, and a failed one answers 451: the remote
/// MTA tries again later and no hard bounce is lost.
pub async fn process(
    ctx: &SessionContext,
    returned: &[Returned],
    body: &[u8],
) -> Result<Processed, Reply> {
    let mut processed = Processed::default();
    let Some(report) = report::parse(body) else {
        for r in returned {
            info!(queue_id = %r.queue_id, account = %r.record.account, rcpt = %r.address, size = body.len(), "message to a return path is not a delivery report (auto-reply?): accepted and dropped");
        }
        return Ok(processed);
    };
    processed.report = true;
    let now = unix_now();
    let mut all = Vec::new();
    for r in returned {
        let (found, ignored) = findings(r, &report, now);
        processed.ignored += ignored;
        all.extend(found);
    }
    for f in &all {
        if let Some((rcpt, reason)) = &f.suppress {
            if let Err(e) = ctx.suppression.add(&f.event.account, rcpt, reason).await {
                warn!(error = %e, rcpt = %rcpt, "suppression list unavailable; bounce report refused for now");
                return Err(Reply::return_paths_unavailable());
            }
            processed.suppressed += 1;
        }
    }
    for f in all {
        let e = &f.event;
        if e.kind() == EventKind::Bounced {
            processed.bounced += 1;
        } else {
            processed.deferred += 1;
        }
        info!(
            queue_id = %e.queue_id,
            account = %e.account,
            rcpt = %e.recipients.join(","),
            kind = e.kind().word(),
            status = %e.enhanced_code,
            class = %e.bounce_class,
            reporting_mta = %report.reporting_mta,
            suppressed = f.suppress.is_some(),
            "bounce report"
        );
        ctx.queue.publish_event(f.event).await;
    }
    Ok(processed)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn returned() -> Returned {
        Returned {
            address: "b+01JD5Z8Q4R6N3V2W1X0Y9Z8A7B-0123456789@bounces.example.test".into(),
            queue_id: QueueId::from_string("01JD5Z8Q4R6N3V2W1X0Y9Z8A7B".into()),
            record: ReturnPathRecord {
                account: "default/app".into(),
                sender: "app@example.test".into(),
                sender_domain: "default/example-test".into(),
                message_id: "<m@example.test>".into(),
                recipients: vec![
                    "ghost@dest.test".into(),
                    "full@dest.test".into(),
                    "slow@dest.test".into(),
                ],
                received_at: 0,
            },
        }
    }

    fn block(
        rcpt: &str,
        action: Action,
        status: Option<&str>,
        diag: Option<&str>,
    ) -> RecipientReport {
        RecipientReport {
            final_recipient: rcpt.into(),
            original_recipient: None,
            action,
            status: status.map(str::to_string),
            remote_mta: None,
            diagnostic: diag.map(str::to_string),
        }
    }

    #[test]
    fn failed_and_delayed_blocks_become_events_hard_ones_suppress() {
        let report = DeliveryReport {
            reporting_mta: "mx.dest.test".into(),
            recipients: vec![
                block(
                    "Ghost@dest.test",
                    Action::Failed,
                    Some("5.1.1"),
                    Some("550 5.1.1 unknown"),
                ),
                block(
                    "full@dest.test",
                    Action::Failed,
                    None,
                    Some("552 5.2.2 Mailbox full"),
                ),
                block("slow@dest.test", Action::Delayed, Some("4.4.1"), None),
                block("someone@else.test", Action::Failed, Some("5.1.1"), None),
                block("ghost@dest.test", Action::Delivered, Some("2.0.0"), None),
            ],
        };
        let (found, ignored) = findings(&returned(), &report, 100);
        assert_eq!(ignored, 2, "another address, and a success");
        assert_eq!(found.len(), 3);
        let ghost = &found[0];
        assert_eq!(ghost.event.kind(), EventKind::Bounced);
        assert_eq!(ghost.event.recipients, vec!["ghost@dest.test".to_string()]);
        assert_eq!(ghost.event.enhanced_code, "5.1.1");
        assert_eq!(ghost.event.bounce_class, "hard");
        assert_eq!(ghost.event.reply_code, 550);
        assert_eq!(ghost.event.account, "default/app");
        assert_eq!(ghost.event.sender, "app@example.test");
        assert_eq!(ghost.event.message_id, "<m@example.test>");
        assert_eq!(ghost.event.queue_id, "01JD5Z8Q4R6N3V2W1X0Y9Z8A7B");
        assert_eq!(ghost.event.remote_host, "mx.dest.test");
        assert!(ghost.suppress.is_some());
        let full = &found[1];
        assert_eq!(
            full.event.enhanced_code, "5.2.2",
            "status from the diagnostic"
        );
        assert_eq!(full.event.bounce_class, "soft");
        assert!(
            full.suppress.is_none(),
            "a full mailbox is not a hard bounce"
        );
        let slow = &found[2];
        assert_eq!(slow.event.kind(), EventKind::Deferred);
        assert_eq!(slow.event.enhanced_code, "4.4.1");
        assert!(slow.suppress.is_none());
    }
}
