//! What the queue holds: message counts of the streams and the delivery consumer's lag.
//! `herald status` prints it; the API serves it (`GET /v1/queue`, `QueueStatus`).

use async_nats::jetstream::{self, context::ConsumerInfoErrorKind};
use herald_core::queue::{BODY_STREAM, EVENTS_STREAM, QUEUE_STREAM};
use serde::Serialize;

/// The durable consumer every delivery worker pulls from (`herald_delivery::worker::CONSUMER`;
/// a test keeps the two equal without making this crate depend on delivery).
pub const DELIVERY_CONSUMER: &str = "delivery";

#[derive(Debug, Clone, Serialize)]
pub struct StreamStatus {
    pub name: String,
    pub messages: u64,
    pub bytes: u64,
    pub consumers: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConsumerStatus {
    pub name: String,
    /// Entries not yet handed to a worker (the lag).
    pub pending: u64,
    /// Entries held by workers, not yet acknowledged.
    pub ack_pending: u64,
    /// Entries delivered to workers more than once.
    pub redelivered: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct QueueStatus {
    /// Queue entries (message × destination domain) not yet finished.
    pub queue: StreamStatus,
    /// Stored message bodies.
    pub bodies: StreamStatus,
    /// Recorded outcomes.
    pub events: StreamStatus,
    /// The delivery workers' consumer; absent until a worker has created it.
    pub delivery: Option<ConsumerStatus>,
}

#[derive(Debug, thiserror::Error)]
#[error("stream {stream}: {reason}")]
pub struct StatusError {
    stream: String,
    reason: String,
}

async fn stream_status(js: &jetstream::Context, name: &str) -> Result<StreamStatus, StatusError> {
    let err = |e: &dyn std::fmt::Display| StatusError {
        stream: name.to_string(),
        reason: e.to_string(),
    };
    let mut stream = js.get_stream(name).await.map_err(|e| err(&e))?;
    let info = stream.info().await.map_err(|e| err(&e))?;
    Ok(StreamStatus {
        name: name.to_string(),
        messages: info.state.messages,
        bytes: info.state.bytes,
        consumers: info.state.consumer_count,
    })
}

async fn delivery_status(js: &jetstream::Context) -> Result<Option<ConsumerStatus>, StatusError> {
    let err = |e: &dyn std::fmt::Display| StatusError {
        stream: QUEUE_STREAM.to_string(),
        reason: e.to_string(),
    };
    let stream = js.get_stream(QUEUE_STREAM).await.map_err(|e| err(&e))?;
    match stream.consumer_info(DELIVERY_CONSUMER).await {
        Ok(info) => Ok(Some(ConsumerStatus {
            name: info.name,
            pending: info.num_pending,
            ack_pending: info.num_ack_pending as u64,
            redelivered: info.num_redelivered as u64,
        })),
        Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => Ok(None),
        Err(e) => Err(err(&e)),
    }
}

pub async fn queue_status(js: &jetstream::Context) -> Result<QueueStatus, StatusError> {
    Ok(QueueStatus {
        queue: stream_status(js, QUEUE_STREAM).await?,
        bodies: stream_status(js, BODY_STREAM).await?,
        events: stream_status(js, EVENTS_STREAM).await?,
        delivery: delivery_status(js).await?,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn delivery_consumer_is_the_one_workers_use() {
        assert_eq!(super::DELIVERY_CONSUMER, herald_delivery::worker::CONSUMER);
    }
}
