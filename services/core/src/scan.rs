//! Reading a slice of a stream for reports: the events of one message, an account's
//! outcomes since a time, the entries of one account in a KV bucket.
//!
//! One ephemeral pull consumer per read, filtered by subject and positioned by the deliver
//! policy (a start time, the last message per subject); batches are fetched without
//! waiting, so a read ends as soon as it has caught up with the stream, and the consumer is
//! deleted afterwards (it would expire by itself after [`INACTIVE`] otherwise). The cost is
//! one consumer creation plus one request per [`BATCH`] messages read; the server does the
//! subject filtering, so only matching messages cross the network.

use std::{ops::ControlFlow, time::Duration};

use async_nats::{
    HeaderMap, Subject,
    jetstream::{
        consumer::{AckPolicy, DeliverPolicy, PullConsumer, ReplayPolicy, pull},
        stream::Stream,
    },
};
use bytes::Bytes;
use futures::StreamExt as _;

use crate::Error;

/// Messages asked for per fetch.
const BATCH: usize = 256;
/// A consumer left behind by a reader that died is removed by the server after this.
const INACTIVE: Duration = Duration::from_secs(60);

/// One message read.
#[derive(Debug)]
pub struct Scanned {
    pub subject: Subject,
    pub headers: Option<HeaderMap>,
    pub payload: Bytes,
    /// Stream sequence: the order the stream recorded it in.
    pub sequence: u64,
}

/// How a read ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanOutcome {
    /// Messages read.
    pub read: usize,
    /// False when the read stopped at its limit before catching up with the stream.
    pub complete: bool,
}

fn consumer_config(filter: &str, deliver_policy: DeliverPolicy) -> pull::Config {
    pull::Config {
        filter_subject: filter.to_string(),
        deliver_policy,
        ack_policy: AckPolicy::None,
        replay_policy: ReplayPolicy::Instant,
        inactive_threshold: INACTIVE,
        // Nothing to keep on disk for a read that lasts a request.
        memory_storage: true,
        num_replicas: 1,
        ..Default::default()
    }
}

async fn remove(stream: &Stream, name: &str) {
    if let Err(e) = stream.delete_consumer(name).await {
        tracing::debug!(error = %e, consumer = name, "read consumer left to expire");
    }
}

/// Reads the messages of `stream` matching `filter` from the position `deliver_policy`
/// names, in stream order, until the stream has no more, `visit` breaks, or `limit`
/// messages were read.
pub async fn scan(
    stream: &Stream,
    filter: &str,
    deliver_policy: DeliverPolicy,
    limit: usize,
    mut visit: impl FnMut(Scanned) -> ControlFlow<()>,
) -> Result<ScanOutcome, Error> {
    let mut consumer: PullConsumer = stream
        .create_consumer(consumer_config(filter, deliver_policy))
        .await
        .map_err(|e| Error::Nats(format!("read consumer on {filter}: {e}")))?;
    let name = consumer.cached_info().name.clone();
    let mut outcome = ScanOutcome {
        read: 0,
        complete: true,
    };
    if consumer.cached_info().num_pending == 0 {
        remove(stream, &name).await;
        return Ok(outcome);
    }
    let result = async {
        loop {
            if outcome.read >= limit {
                // Still pending means there was more to read.
                let info = consumer.info().await.map_err(Error::nats)?;
                outcome.complete = info.num_pending == 0;
                return Ok(());
            }
            let want = BATCH.min(limit - outcome.read);
            let mut batch = consumer
                .fetch()
                .max_messages(want)
                .messages()
                .await
                .map_err(Error::nats)?;
            let mut got = 0;
            while let Some(msg) = batch.next().await {
                let msg = msg.map_err(Error::nats)?;
                let info = msg.info().map_err(Error::nats)?;
                let (sequence, pending) = (info.stream_sequence, info.pending);
                got += 1;
                outcome.read += 1;
                let msg = msg.split().0;
                let scanned = Scanned {
                    subject: msg.subject,
                    headers: msg.headers,
                    payload: msg.payload,
                    sequence,
                };
                if visit(scanned).is_break() || pending == 0 {
                    return Ok(());
                }
            }
            if got == 0 {
                return Ok(());
            }
        }
    }
    .await;
    remove(stream, &name).await;
    result.map(|()| outcome)
}

/// How many messages of `stream` match `filter` from the position `deliver_policy` names,
/// without reading them: the pending count of a consumer created there.
pub async fn count(
    stream: &Stream,
    filter: &str,
    deliver_policy: DeliverPolicy,
) -> Result<u64, Error> {
    let consumer: PullConsumer = stream
        .create_consumer(consumer_config(filter, deliver_policy))
        .await
        .map_err(|e| Error::Nats(format!("read consumer on {filter}: {e}")))?;
    let info = consumer.cached_info();
    let (name, pending) = (info.name.clone(), info.num_pending);
    remove(stream, &name).await;
    Ok(pending)
}

/// The position of the first message recorded at or after `unix_seconds` (clamped to the
/// epoch).
pub fn start_time(unix_seconds: i64) -> Result<DeliverPolicy, Error> {
    let nanos = i128::from(unix_seconds.max(0)) * 1_000_000_000;
    let start_time = async_nats::datetime::from_nanos(nanos)
        .map_err(|e| Error::Nats(format!("start time {unix_seconds}: {e}")))?;
    Ok(DeliverPolicy::ByStartTime { start_time })
}
