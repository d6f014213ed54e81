//! "Where is my email?": every event of one message, read back from `HERALD_EVENTS`.
//!
//! Events are filed by account and kind (`herald.events.<account>.<kind>`), not by message,
//! so a message's events are found by reading the stream from the moment it was accepted:
//! a queue id is a ULID, whose first 48 bits are that moment, and the read starts there (a
//! minute earlier, for clocks that disagree). It stops as soon as every recipient the
//! `received` event listed has a final outcome (delivered, bounced, expired, failed,
//! suppressed), at the last event that could still belong to the message (accepted plus
//! `nats.queue_lifetime` plus a day), at the end of the stream, or after `api.max_scan`
//! events. The cost is thus the events recorded, by every account, while the message was in
//! flight: seconds' worth for mail delivered at once, at most a queue lifetime's worth (capped
//! by `api.max_scan`) for mail still retrying.
//!
//! A Message-ID header value instead of a queue id is first looked up among the `received`
//! events of the last `api.message_id_lookback` (the server filters on the subject, so only
//! those cross the network); the latest submission with that Message-ID wins.

use std::{
    collections::{BTreeMap, BTreeSet},
    ops::ControlFlow,
    time::Duration,
};

use async_nats::jetstream::stream::Stream;
use herald_core::{
    envelope::{Event, EventKind},
    scan,
};
use prost::Message as _;

use crate::ApiError;

/// Every event subject.
const ALL_EVENTS: &str = "herald.events.>";
/// How much earlier than its queue id's time a message's first event may be recorded
/// (ingress and NATS clocks disagreeing).
const CLOCK_SKEW_SECS: i64 = 60;
/// Events (a late expiry, a delay warning) may follow the queue lifetime by this much.
const AFTER_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// What a caller asked about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// A queue id, and the Unix time (ms) it was made at.
    Queue { id: String, at_ms: u64 },
    /// A Message-ID header value, without angle brackets.
    MessageId(String),
}

impl Lookup {
    pub fn parse(s: &str) -> Result<Lookup, ApiError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(ApiError::BadRequest(
                "a queue id or Message-ID is required".into(),
            ));
        }
        if let Ok(ulid) = ulid::Ulid::from_string(s) {
            return Ok(Lookup::Queue {
                id: ulid.to_string(),
                at_ms: ulid.timestamp_ms(),
            });
        }
        let message_id = normalize_message_id(s);
        if message_id.contains('@') && !message_id.chars().any(char::is_whitespace) {
            return Ok(Lookup::MessageId(message_id));
        }
        Err(ApiError::BadRequest(format!(
            "{s:?} is neither a queue id nor a Message-ID"
        )))
    }
}

/// `<a@b>` and `a@b` are the same Message-ID.
pub fn normalize_message_id(s: &str) -> String {
    s.trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_string()
}

/// Where one recipient stands: its latest event.
#[derive(Debug, Clone, PartialEq)]
pub struct RecipientState {
    pub address: String,
    pub state: EventKind,
    pub at: i64,
    pub reply: String,
    pub bounce_class: String,
}

/// A message's events in stream order, and each recipient's state.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageHistory {
    pub queue_id: String,
    pub events: Vec<Event>,
    /// In the order the recipients first appeared.
    pub recipients: Vec<RecipientState>,
    /// False when the read stopped at `api.max_scan` before the message's end.
    pub complete: bool,
}

/// Outcomes after which nothing more happens to a recipient.
pub fn is_final(kind: EventKind) -> bool {
    matches!(
        kind,
        EventKind::Delivered
            | EventKind::Bounced
            | EventKind::Failed
            | EventKind::Suppressed
            | EventKind::Expired
    )
}

/// Folds a message's events, in order, into its history.
#[derive(Debug)]
pub struct History {
    queue_id: String,
    events: Vec<Event>,
    /// Keyed by the lower-cased address: the case of a local part is the sender's whim.
    states: BTreeMap<String, RecipientState>,
    order: Vec<String>,
    /// The recipients the `received` event listed, once it was seen.
    expected: Option<BTreeSet<String>>,
}

impl History {
    pub fn new(queue_id: &str) -> History {
        History {
            queue_id: queue_id.to_string(),
            events: Vec::new(),
            states: BTreeMap::new(),
            order: Vec::new(),
            expected: None,
        }
    }

    /// Takes `event` if it belongs to this message.
    pub fn push(&mut self, event: Event) {
        if event.queue_id != self.queue_id {
            return;
        }
        let kind = event.kind();
        if kind == EventKind::Received {
            self.expected = Some(event.recipients.iter().map(|r| r.to_lowercase()).collect());
        }
        for address in &event.recipients {
            let key = address.to_lowercase();
            let state = RecipientState {
                address: address.clone(),
                state: kind,
                at: event.at,
                reply: event.reply_text.clone(),
                bounce_class: event.bounce_class.clone(),
            };
            match self.states.get_mut(&key) {
                // `received` opens the story; nothing after it is undone by it.
                Some(_) if kind == EventKind::Received => {}
                // The address as first written (the `received` event's spelling) stays.
                Some(existing) => {
                    *existing = RecipientState {
                        address: std::mem::take(&mut existing.address),
                        ..state
                    }
                }
                None => {
                    self.order.push(key.clone());
                    self.states.insert(key, state);
                }
            }
        }
        self.events.push(event);
    }

    /// True once the `received` event was seen and every recipient it listed has a final
    /// outcome: nothing later can belong to the message (but a duplicate delivery after a
    /// worker crash, which the read does not wait for).
    pub fn settled(&self) -> bool {
        let Some(expected) = &self.expected else {
            return false;
        };
        expected
            .iter()
            .all(|r| self.states.get(r).is_some_and(|s| is_final(s.state)))
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    pub fn finish(mut self, complete: bool) -> MessageHistory {
        let recipients = self
            .order
            .iter()
            .filter_map(|k| self.states.remove(k))
            .collect();
        MessageHistory {
            queue_id: self.queue_id,
            events: self.events,
            recipients,
            complete,
        }
    }
}

/// Decodes one event; a payload that is not one is skipped (and logged), never fatal.
fn decode(payload: &[u8], sequence: u64) -> Option<Event> {
    match Event::decode(payload) {
        Ok(e) => Some(e),
        Err(e) => {
            tracing::warn!(error = %e, sequence, "undecodable event skipped");
            None
        }
    }
}

/// The events of `queue_id` (made at `at_ms`), read as the module documentation describes.
pub async fn read(
    events: &Stream,
    queue_id: &str,
    at_ms: u64,
    queue_lifetime: Duration,
    limit: usize,
) -> Result<MessageHistory, ApiError> {
    let accepted = i64::try_from(at_ms / 1000).unwrap_or(i64::MAX);
    let last = accepted.saturating_add(
        i64::try_from((queue_lifetime + AFTER_LIFETIME).as_secs()).unwrap_or(i64::MAX),
    );
    let mut history = History::new(queue_id);
    let mut past_end = false;
    let outcome = scan::scan(
        events,
        ALL_EVENTS,
        scan::start_time(accepted.saturating_sub(CLOCK_SKEW_SECS))?,
        limit,
        |m| {
            let Some(event) = decode(&m.payload, m.sequence) else {
                return ControlFlow::Continue(());
            };
            if event.at > last {
                past_end = true;
                return ControlFlow::Break(());
            }
            history.push(event);
            if history.settled() {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        },
    )
    .await?;
    if history.is_empty() {
        return Err(ApiError::NotFound(format!(
            "no events of message {queue_id} (unknown, or older than nats.events_retention)"
        )));
    }
    let complete = outcome.complete || past_end || history.settled();
    Ok(history.finish(complete))
}

/// The queue id of the latest message accepted since `since` (Unix seconds) with this
/// Message-ID.
pub async fn find_by_message_id(
    events: &Stream,
    message_id: &str,
    since: i64,
    limit: usize,
) -> Result<Option<String>, ApiError> {
    let filter = format!("herald.events.*.{}", EventKind::Received.word());
    let mut found = None;
    scan::scan(events, &filter, scan::start_time(since)?, limit, |m| {
        if let Some(event) = decode(&m.payload, m.sequence)
            && normalize_message_id(&event.message_id) == message_id
        {
            found = Some(event.queue_id);
        }
        ControlFlow::Continue(())
    })
    .await?;
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: EventKind, rcpts: &[&str], at: i64) -> Event {
        Event {
            kind: kind as i32,
            queue_id: "01J0000000000000000000000Q".into(),
            account: "default/app".into(),
            recipients: rcpts.iter().map(|r| r.to_string()).collect(),
            at,
            reply_text: format!("reply {at}"),
            ..Default::default()
        }
    }

    #[test]
    fn queue_ids_carry_their_time_and_message_ids_lose_their_brackets() {
        let id = ulid::Ulid::from_parts(1_700_000_000_000, 42).to_string();
        assert_eq!(
            Lookup::parse(&id).expect("ulid"),
            Lookup::Queue {
                id: id.clone(),
                at_ms: 1_700_000_000_000
            }
        );
        assert_eq!(
            Lookup::parse(" <abc.123@example.test> ").expect("message id"),
            Lookup::MessageId("abc.123@example.test".into())
        );
        for bad in ["", "   ", "nothing", "a b@c", "../../etc"] {
            assert!(
                matches!(Lookup::parse(bad), Err(ApiError::BadRequest(_))),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn recipients_end_in_their_latest_state() {
        let mut h = History::new("01J0000000000000000000000Q");
        h.push(event(EventKind::Received, &["a@x.test", "B@y.test"], 1));
        h.push(event(EventKind::Deferred, &["a@x.test"], 2));
        assert!(!h.settled());
        h.push(event(EventKind::Bounced, &["b@y.test"], 3));
        assert!(!h.settled(), "a@x.test is still deferred");
        h.push(event(EventKind::Delivered, &["a@x.test"], 4));
        assert!(h.settled());
        let m = h.finish(true);
        assert_eq!(m.events.len(), 4);
        let states: Vec<(&str, EventKind, i64)> = m
            .recipients
            .iter()
            .map(|r| (r.address.as_str(), r.state, r.at))
            .collect();
        assert_eq!(
            states,
            vec![
                ("a@x.test", EventKind::Delivered, 4),
                ("B@y.test", EventKind::Bounced, 3)
            ]
        );
        assert_eq!(m.recipients[0].reply, "reply 4");
    }

    #[test]
    fn other_messages_events_are_ignored() {
        let mut h = History::new("01J0000000000000000000000Q");
        let mut other = event(EventKind::Delivered, &["a@x.test"], 1);
        other.queue_id = "01J0000000000000000000000R".into();
        h.push(other);
        assert!(h.is_empty());
    }

    #[test]
    fn without_the_received_event_the_read_goes_on() {
        // Its publish can fail (events never block mail): final outcomes alone do not prove
        // that no recipient is missing.
        let mut h = History::new("01J0000000000000000000000Q");
        h.push(event(EventKind::Delivered, &["a@x.test"], 2));
        assert!(!h.settled());
    }

    #[test]
    fn a_delay_warning_is_not_an_outcome() {
        assert!(!is_final(EventKind::Delayed));
        assert!(!is_final(EventKind::Deferred));
        assert!(is_final(EventKind::Expired));
        assert!(is_final(EventKind::Suppressed));
    }
}
