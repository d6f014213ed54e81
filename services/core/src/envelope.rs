//! The queue envelope and events, generated from `proto/herald/v1/queue.proto`.

#[allow(clippy::all, clippy::pedantic)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/herald.v1.rs"));
}

pub use generated::*;

impl BodyRef {
    /// A body carried inside its entry (see `BodyRef.inline` in queue.proto).
    pub fn inline(body: bytes::Bytes, sha256: String) -> BodyRef {
        BodyRef {
            size: body.len() as u64,
            location: Some(body_ref::Location::Inline(body)),
            sha256,
        }
    }
}

impl EventKind {
    /// The lower-case word used in event subjects (`herald.events.<account>.<kind>`).
    pub fn word(self) -> &'static str {
        match self {
            EventKind::Unspecified => "unspecified",
            EventKind::Received => "received",
            EventKind::Delivered => "delivered",
            EventKind::Deferred => "deferred",
            EventKind::Bounced => "bounced",
            EventKind::Failed => "failed",
            EventKind::Suppressed => "suppressed",
            EventKind::Expired => "expired",
            EventKind::Delayed => "delayed",
        }
    }
}
