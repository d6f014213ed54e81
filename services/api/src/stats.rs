//! An account's outcomes since a time, per kind, read from its event subjects.
//!
//! Counting a kind costs one request and reads no event: a consumer on
//! `herald.events.<account>.<kind>` positioned at the start of the window knows how many
//! messages it has pending. Only bounces are read, to split them by class, and at most
//! `api.max_scan` of them.

use std::{collections::BTreeMap, ops::ControlFlow};

use async_nats::jetstream::stream::Stream;
use futures::future::try_join_all;
use herald_core::{
    envelope::{Event, EventKind},
    queue::event_subject,
    scan,
};
use prost::Message as _;
use serde::Serialize;

use crate::{AccountId, ApiError};

/// The window when the caller names none.
pub const DEFAULT_WINDOW_SECS: i64 = 24 * 3600;

/// The kinds counted, each its own subject.
pub const COUNTED: [EventKind; 8] = [
    EventKind::Received,
    EventKind::Delivered,
    EventKind::Deferred,
    EventKind::Bounced,
    EventKind::Failed,
    EventKind::Suppressed,
    EventKind::Expired,
    EventKind::Delayed,
];

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AccountStats {
    pub account: String,
    /// Start of the window, Unix seconds.
    pub since: i64,
    pub received: u64,
    pub delivered: u64,
    pub deferred: u64,
    pub bounced: u64,
    pub failed: u64,
    pub suppressed: u64,
    pub expired: u64,
    pub delayed: u64,
    /// Bounces per class: hard, policy, permanent.
    pub bounced_by_class: BTreeMap<String, u64>,
    /// False when the classes count only the first `api.max_scan` bounces.
    pub complete: bool,
}

impl AccountStats {
    fn set(&mut self, kind: EventKind, n: u64) {
        let slot = match kind {
            EventKind::Received => &mut self.received,
            EventKind::Delivered => &mut self.delivered,
            EventKind::Deferred => &mut self.deferred,
            EventKind::Bounced => &mut self.bounced,
            EventKind::Failed => &mut self.failed,
            EventKind::Suppressed => &mut self.suppressed,
            EventKind::Expired => &mut self.expired,
            EventKind::Delayed => &mut self.delayed,
            EventKind::Unspecified => return,
        };
        *slot = n;
    }

    /// Counts one bounce event by its class.
    fn classify(&mut self, event: &Event) {
        let class = if event.bounce_class.is_empty() {
            "unknown"
        } else {
            event.bounce_class.as_str()
        };
        *self.bounced_by_class.entry(class.to_string()).or_default() += 1;
    }
}

/// The start of the window: `since` (Unix seconds), or the last day when it is absent or 0.
pub fn window_start(since: Option<i64>, now: i64) -> Result<i64, ApiError> {
    match since {
        None | Some(0) => Ok(now - DEFAULT_WINDOW_SECS),
        Some(s) if s < 0 => Err(ApiError::BadRequest(format!(
            "since {s} is not a Unix time"
        ))),
        Some(s) => Ok(s),
    }
}

pub async fn read(
    events: &Stream,
    account: &AccountId,
    since: i64,
    limit: usize,
) -> Result<AccountStats, ApiError> {
    let id = account.to_string();
    let start = scan::start_time(since)?;
    let counts = try_join_all(COUNTED.iter().map(|&kind| {
        let subject = event_subject(&id, kind);
        async move {
            scan::count(events, &subject, start)
                .await
                .map(|n| (kind, n))
        }
    }))
    .await?;
    let mut stats = AccountStats {
        account: id.clone(),
        since,
        complete: true,
        ..Default::default()
    };
    for (kind, n) in counts {
        stats.set(kind, n);
    }
    if stats.bounced > 0 {
        let subject = event_subject(&id, EventKind::Bounced);
        let outcome = scan::scan(events, &subject, start, limit, |m| {
            // Subject tokens flatten `/` and `.`: the event itself says whose it is.
            if let Ok(event) = Event::decode(m.payload.as_ref())
                && event.account == id
            {
                stats.classify(&event);
            }
            ControlFlow::Continue(())
        })
        .await?;
        stats.complete = outcome.complete;
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_defaults_to_the_last_day() {
        assert_eq!(window_start(None, 100_000).expect("ok"), 100_000 - 86_400);
        assert_eq!(
            window_start(Some(0), 100_000).expect("ok"),
            100_000 - 86_400
        );
        assert_eq!(window_start(Some(5), 100_000).expect("ok"), 5);
        assert!(matches!(
            window_start(Some(-1), 100_000),
            Err(ApiError::BadRequest(_))
        ));
    }

    #[test]
    fn every_kind_but_unspecified_is_counted_once() {
        let mut s = AccountStats::default();
        for (i, kind) in COUNTED.iter().enumerate() {
            s.set(*kind, i as u64 + 1);
        }
        assert_eq!(
            [
                s.received,
                s.delivered,
                s.deferred,
                s.bounced,
                s.failed,
                s.suppressed,
                s.expired,
                s.delayed
            ],
            [1, 2, 3, 4, 5, 6, 7, 8]
        );
    }

    #[test]
    fn bounces_are_split_by_class() {
        let mut s = AccountStats::default();
        for class in ["hard", "hard", "policy", ""] {
            s.classify(&Event {
                bounce_class: class.into(),
                ..Default::default()
            });
        }
        assert_eq!(
            s.bounced_by_class,
            [
                ("hard".into(), 2),
                ("policy".into(), 1),
                ("unknown".into(), 1)
            ]
            .into()
        );
    }
}
