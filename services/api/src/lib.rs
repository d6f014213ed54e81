//! Herald's API: what the queue holds, read from JetStream. `herald status` prints it; the
//! gRPC and HTTP front-ends come with the API issue.

use async_nats::jetstream;
use herald_core::queue::{BODY_STREAM, EVENTS_STREAM, QUEUE_STREAM};
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct StreamStatus {
    pub name: String,
    pub messages: u64,
    pub bytes: u64,
    pub consumers: usize,
}

#[derive(Debug, Serialize)]
pub struct QueueStatus {
    /// Queue entries (message × destination domain) not yet finished.
    pub queue: StreamStatus,
    /// Stored message bodies.
    pub bodies: StreamStatus,
    /// Recorded outcomes.
    pub events: StreamStatus,
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

pub async fn queue_status(js: &jetstream::Context) -> Result<QueueStatus, StatusError> {
    Ok(QueueStatus {
        queue: stream_status(js, QUEUE_STREAM).await?,
        bodies: stream_status(js, BODY_STREAM).await?,
        events: stream_status(js, EVENTS_STREAM).await?,
    })
}
