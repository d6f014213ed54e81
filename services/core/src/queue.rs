//! JetStream layout shared by every role, created idempotently by whichever pod starts first.
//!
//! - `HERALD_QUEUE` (work queue, `herald.queue.<domain>`): one [`QueueEntry`] per message
//!   and destination domain, de-duplicated by `Nats-Msg-Id` within the duplicate window.
//!   Entries that must wait (a retry after a temporary failure, mail held by the hourly
//!   limit) are NATS message schedules (ADR-51, nats-server 2.12+) on
//!   `herald.schedule.<queue id>.<attempt>.<domain>`: the server republishes them to
//!   `herald.queue.<domain>` at their time. Waiting mail thus occupies no consumer's
//!   ack-pending window and is never redelivered in a loop.
//! - Bodies are stored once per message. A message with one destination domain carries its
//!   body inside its one entry when both fit in a NATS message (most mail: no round trips
//!   for the body at all). Otherwise `HERALD_BODIES` (`herald.body.<queue id>`, direct get)
//!   holds it, or, above the server's max payload, the `HERALD_LARGE_BODIES` object store.
//! - `HERALD_PENDING` (KV): per message with several destination domains, those not yet
//!   finished; the body is removed when the last one finishes (or when the queue lifetime
//!   expires).
//! - `HERALD_EVENTS` (`herald.events.<account>.<kind>`): every outcome, for reports and the API.

use std::time::Duration;

use async_nats::{
    HeaderMap,
    jetstream::{
        self, kv, message::PublishMessage as Publish, object_store, publish::PublishAck, stream,
        stream::RetentionPolicy,
    },
};
use bytes::Bytes;
use prost::Message as _;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio_util::task::TaskTracker;

use crate::{
    Error,
    config::NatsConfig,
    envelope::{BodyRef, Event, EventKind, QueueEntry, body_ref::Location},
};

pub const QUEUE_STREAM: &str = "HERALD_QUEUE";
pub const QUEUE_SUBJECTS: &str = "herald.queue.>";
pub const SCHEDULE_SUBJECTS: &str = "herald.schedule.>";
pub const BODY_STREAM: &str = "HERALD_BODIES";
pub const EVENTS_STREAM: &str = "HERALD_EVENTS";
pub const PENDING_BUCKET: &str = "HERALD_PENDING";
pub const LARGE_BODY_BUCKET: &str = "HERALD_LARGE_BODIES";
/// Header carrying the W3C trace context of the transaction that queued an entry.
pub const TRACEPARENT: &str = "traceparent";

/// Room left in a NATS message for headers when deciding whether a body fits inline.
const HEADER_ROOM: usize = 8 * 1024;

/// NATS's default max payload, assumed when the server has not told us its own.
const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

/// Largest body stored inline in the body stream. Read from the server's INFO only after
/// the set-up requests above were answered: the client connects in the background, and an
/// INFO not yet received reads as 0, which sent every body to the object store (found by
/// the benchmark, where each object read also cost a consumer).
fn inline_limit(max_payload: usize) -> usize {
    let max = if max_payload == 0 {
        DEFAULT_MAX_PAYLOAD
    } else {
        max_payload
    };
    max.saturating_sub(HEADER_ROOM)
}

pub fn queue_subject(domain: &str) -> String {
    format!("herald.queue.{domain}")
}

pub fn body_subject(queue_id: &str) -> String {
    format!("herald.body.{queue_id}")
}

/// A subject token for an account id (`namespace/name`): dots would split it.
pub fn account_token(account: &str) -> String {
    account.replace(['.', '/', '*', '>', ' '], "_")
}

pub fn event_subject(account: &str, kind: EventKind) -> String {
    format!("herald.events.{}.{}", account_token(account), kind.word())
}

/// Connects to NATS with the configured URL and credentials. The client reconnects by
/// itself; publishes made while disconnected time out and are reported as failures.
pub async fn connect(cfg: &NatsConfig) -> Result<async_nats::Client, Error> {
    let mut opts = async_nats::ConnectOptions::new()
        .name("herald")
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(5));
    if let Some(creds) = &cfg.credentials {
        opts = opts
            .credentials_file(creds)
            .await
            .map_err(|e| Error::Nats(format!("{}: {e}", creds.display())))?;
    }
    opts.connect(cfg.url.as_str()).await.map_err(Error::nats)
}

/// Handles on every stream and bucket.
#[derive(Clone)]
pub struct Queue {
    js: jetstream::Context,
    bodies: stream::Stream,
    large_bodies: object_store::ObjectStore,
    pending: kv::Store,
    inline_limit: usize,
    publish_timeout: Duration,
    /// Acknowledgements of emitted events still awaited.
    events: TaskTracker,
}

impl Queue {
    /// Creates (or updates to the configured shape) every stream and bucket.
    pub async fn setup(client: async_nats::Client, cfg: &NatsConfig) -> Result<Queue, Error> {
        let js = jetstream::new(client.clone());
        let replicas = cfg.replicas.max(1);
        js.create_or_update_stream(stream::Config {
            name: QUEUE_STREAM.into(),
            description: Some("Herald delivery queue: one entry per message and domain".into()),
            subjects: vec![QUEUE_SUBJECTS.into(), SCHEDULE_SUBJECTS.into()],
            retention: RetentionPolicy::WorkQueue,
            allow_message_schedules: true,
            storage: stream::StorageType::File,
            num_replicas: replicas,
            max_age: cfg.queue_lifetime,
            duplicate_window: cfg.duplicate_window,
            ..Default::default()
        })
        .await
        .map_err(|e| Error::Nats(format!("stream {QUEUE_STREAM}: {e}")))?;
        js.create_or_update_stream(stream::Config {
            name: BODY_STREAM.into(),
            description: Some("Herald message bodies, stored once per message".into()),
            subjects: vec!["herald.body.>".into()],
            retention: RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            num_replicas: replicas,
            // A day beyond the queue lifetime: an expiring entry can still quote its
            // message's headers in the bounce.
            max_age: cfg.queue_lifetime + Duration::from_secs(24 * 3600),
            max_messages_per_subject: 1,
            allow_direct: true,
            ..Default::default()
        })
        .await
        .map_err(|e| Error::Nats(format!("stream {BODY_STREAM}: {e}")))?;
        js.create_or_update_stream(stream::Config {
            name: EVENTS_STREAM.into(),
            description: Some("Herald outcomes: received, delivered, deferred, failed".into()),
            subjects: vec!["herald.events.>".into()],
            retention: RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            num_replicas: replicas,
            max_age: cfg.events_retention,
            ..Default::default()
        })
        .await
        .map_err(|e| Error::Nats(format!("stream {EVENTS_STREAM}: {e}")))?;
        let pending = js
            .create_or_update_key_value(kv::Config {
                bucket: PENDING_BUCKET.into(),
                description: "Destination domains of each message not yet finished".into(),
                history: 1,
                max_age: cfg.queue_lifetime,
                storage: stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| Error::Nats(format!("bucket {PENDING_BUCKET}: {e}")))?;
        let large_bodies = match js.get_object_store(LARGE_BODY_BUCKET).await {
            Ok(store) => store,
            Err(_) => js
                .create_object_store(object_store::Config {
                    bucket: LARGE_BODY_BUCKET.into(),
                    description: Some("Message bodies above the NATS max payload".into()),
                    max_age: cfg.queue_lifetime,
                    storage: stream::StorageType::File,
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| Error::Nats(format!("object store {LARGE_BODY_BUCKET}: {e}")))?,
        };
        let bodies = js
            .get_stream(BODY_STREAM)
            .await
            .map_err(|e| Error::Nats(format!("stream {BODY_STREAM}: {e}")))?;
        Ok(Queue {
            js,
            bodies,
            large_bodies,
            pending,
            inline_limit: inline_limit(client.server_info().max_payload),
            publish_timeout: cfg.publish_timeout,
            events: TaskTracker::new(),
        })
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// Places a message's body: inside `entry` (its only entry, `sole_domain`, given
    /// without a body) when the two fit in one NATS message beside its headers; otherwise
    /// stored once with [`Queue::store_body`]. The caller puts the reference in the entry.
    pub async fn place_body(
        &self,
        entry: &QueueEntry,
        body: Bytes,
        sha256: String,
    ) -> Result<BodyRef, Error> {
        // The body field costs its bytes plus tags and lengths, the BodyRef's own too.
        let inline_len = entry.encoded_len() + body.len() + sha256.len() + 32;
        if entry.sole_domain && inline_len <= self.inline_limit {
            return Ok(BodyRef::inline(body, sha256));
        }
        self.store_body(&entry.id, body, sha256).await
    }

    async fn acked(&self, fut: jetstream::context::PublishAckFuture) -> Result<PublishAck, Error> {
        acked(fut, self.publish_timeout).await
    }

    async fn publish(&self, subject: String, publish: Publish) -> Result<PublishAck, Error> {
        let fut =
            tokio::time::timeout(self.publish_timeout, self.js.send_publish(subject, publish))
                .await
                .map_err(|_| Error::Nats("JetStream publish timed out".into()))?
                .map_err(Error::nats)?;
        self.acked(fut).await
    }

    /// Stores a body once and returns its reference; returns only after JetStream acked it.
    /// `sha256` is the digest of the client's bytes (see [`BodyRef`]), computed by the
    /// caller, which needs it anyway: the body is not hashed again here.
    pub async fn store_body(
        &self,
        queue_id: &str,
        body: Bytes,
        sha256: String,
    ) -> Result<BodyRef, Error> {
        let size = body.len() as u64;
        let location = if body.len() <= self.inline_limit {
            let subject = body_subject(queue_id);
            self.publish(subject.clone(), Publish::build().payload(body))
                .await?;
            Location::StreamSubject(subject)
        } else {
            let mut reader: &[u8] = &body;
            tokio::time::timeout(
                self.publish_timeout * 4,
                self.large_bodies.put(queue_id, &mut reader),
            )
            .await
            .map_err(|_| Error::Nats("object store put timed out".into()))?
            .map_err(Error::nats)?;
            Location::Object(queue_id.to_string())
        };
        Ok(BodyRef {
            location: Some(location),
            size,
            sha256,
        })
    }

    /// Reads a body back, checking it has the size the entry recorded. Not hashed again: the
    /// subject names the message's queue id, holds one message, and JetStream checksums its
    /// file store; hashing the whole body here cost 7 % of delivery's CPU at 100 KiB.
    pub async fn load_body(&self, body: &BodyRef) -> Result<Bytes, Error> {
        let data = match &body.location {
            Some(Location::StreamSubject(subject)) => {
                match self
                    .bodies
                    .direct_get_last_for_subject(subject.clone())
                    .await
                {
                    Ok(msg) => msg.payload,
                    Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => {
                        return Err(Error::BodyMissing(subject.clone()));
                    }
                    Err(e) => return Err(Error::nats(e)),
                }
            }
            Some(Location::Inline(data)) => data.clone(),
            Some(Location::Object(name)) => {
                let mut obj = match self.large_bodies.get(name).await {
                    Ok(obj) => obj,
                    Err(e) if e.kind() == object_store::GetErrorKind::NotFound => {
                        return Err(Error::BodyMissing(name.clone()));
                    }
                    Err(e) => return Err(Error::nats(e)),
                };
                let mut buf = Vec::with_capacity(body.size as usize);
                obj.read_to_end(&mut buf).await.map_err(Error::nats)?;
                Bytes::from(buf)
            }
            None => return Err(Error::Envelope("entry has no body reference".into())),
        };
        if data.len() as u64 != body.size {
            return Err(Error::Envelope(format!(
                "stored body has {} bytes, its entry says {}",
                data.len(),
                body.size
            )));
        }
        Ok(data)
    }

    async fn delete_body(&self, body: &BodyRef) -> Result<(), Error> {
        match &body.location {
            Some(Location::StreamSubject(subject)) => {
                self.bodies
                    .purge()
                    .filter(subject.clone())
                    .await
                    .map_err(Error::nats)?;
            }
            Some(Location::Object(name)) => {
                self.large_bodies.delete(name).await.map_err(Error::nats)?;
            }
            // Gone with the entry.
            Some(Location::Inline(_)) | None => {}
        }
        Ok(())
    }

    /// Records which domains of `queue_id` are still to be finished.
    pub async fn track_pending(&self, queue_id: &str, domains: &[String]) -> Result<(), Error> {
        let value = serde_json::to_vec(domains).map_err(Error::nats)?;
        tokio::time::timeout(
            self.publish_timeout,
            self.pending.put(queue_id, value.into()),
        )
        .await
        .map_err(|_| Error::Nats("pending bucket put timed out".into()))?
        .map_err(Error::nats)?;
        Ok(())
    }

    /// Publishes one entry and waits for its PubAck. `dedup_id` makes a re-submission of
    /// the same message within the duplicate window a no-op.
    pub async fn publish_entry(
        &self,
        entry: &QueueEntry,
        dedup_id: Option<String>,
    ) -> Result<PublishAck, Error> {
        let mut headers = HeaderMap::new();
        if !entry.traceparent.is_empty() {
            headers.insert(TRACEPARENT, entry.traceparent.as_str());
        }
        let mut publish = Publish::build()
            .payload(entry.encode_to_vec().into())
            .headers(headers);
        if let Some(id) = dedup_id {
            publish = publish.message_id(id);
        }
        self.publish(queue_subject(&entry.domain), publish).await
    }

    /// Queues `entry` to become deliverable at `at` (Unix seconds): a message schedule that
    /// the server republishes to the entry's queue subject then. Returns after the PubAck.
    pub async fn schedule_entry(
        &self,
        entry: &QueueEntry,
        at: i64,
        dedup_id: Option<String>,
    ) -> Result<PublishAck, Error> {
        let when = k8s_openapi::jiff::Timestamp::from_second(at)
            .map_err(|e| Error::Envelope(format!("schedule time {at}: {e}")))?;
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Schedule", format!("@at {when}").as_str());
        headers.insert(
            "Nats-Schedule-Target",
            queue_subject(&entry.domain).as_str(),
        );
        if !entry.traceparent.is_empty() {
            headers.insert(TRACEPARENT, entry.traceparent.as_str());
        }
        let mut publish = Publish::build()
            .payload(entry.encode_to_vec().into())
            .headers(headers);
        if let Some(id) = dedup_id {
            publish = publish.message_id(id);
        }
        let subject = format!(
            "herald.schedule.{}.{}.{}",
            entry.id, entry.attempt, entry.domain
        );
        self.publish(subject, publish).await
    }

    /// Marks `domain` of `entry`'s message finished (delivered or failed for good); removes
    /// the body once every domain is. Idempotent: a redelivered entry finishes twice safely.
    pub async fn finish_domain(&self, entry: &QueueEntry) -> Result<(), Error> {
        if entry.sole_domain {
            // The message's only entry: there is no pending record to consult.
            return match &entry.body {
                Some(body) => self.delete_body(body).await,
                None => Ok(()),
            };
        }
        for _ in 0..16 {
            let Some(current) = self
                .pending
                .entry(entry.id.as_str())
                .await
                .map_err(Error::nats)?
            else {
                return Ok(());
            };
            if current.operation != kv::Operation::Put {
                return Ok(());
            }
            let mut domains: Vec<String> =
                serde_json::from_slice(&current.value).unwrap_or_default();
            let before = domains.len();
            domains.retain(|d| d != &entry.domain);
            if domains.len() == before && before > 0 {
                return Ok(());
            }
            if domains.is_empty() {
                match self
                    .pending
                    .delete_expect_revision(entry.id.as_str(), Some(current.revision))
                    .await
                {
                    Ok(()) => {
                        if let Some(body) = &entry.body {
                            self.delete_body(body).await?;
                        }
                        return Ok(());
                    }
                    Err(_) => continue,
                }
            }
            let value = serde_json::to_vec(&domains).map_err(Error::nats)?;
            if self
                .pending
                .update(entry.id.as_str(), value.into(), current.revision)
                .await
                .is_ok()
            {
                return Ok(());
            }
        }
        Err(Error::Nats(format!(
            "pending record of {} kept changing; body left to expire",
            entry.id
        )))
    }

    /// Publishes an outcome without waiting for its acknowledgement, which a task awaits
    /// (and logs if it fails): the event is on the wire before this returns, in order with
    /// what the caller publishes next, but the caller's reply (a `250`, the next entry)
    /// does not wait for the round trip. [`Queue::settle_events`] waits for the stragglers
    /// at shutdown.
    pub async fn emit_event(&self, event: Event) {
        let subject = event_subject(&event.account, event.kind());
        let publish = Publish::build().payload(event.encode_to_vec().into());
        let sent =
            tokio::time::timeout(self.publish_timeout, self.js.send_publish(subject, publish))
                .await;
        match sent {
            Ok(Ok(ack)) => {
                let (timeout, queue_id) = (self.publish_timeout, event.queue_id);
                self.events.spawn(async move {
                    if let Err(e) = acked(ack, timeout).await {
                        tracing::warn!(error = %e, %queue_id, "event not recorded");
                    }
                });
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, queue_id = %event.queue_id, "event not recorded")
            }
            Err(_) => {
                tracing::warn!(queue_id = %event.queue_id, "event not recorded: publish timed out")
            }
        }
    }

    /// Waits (at most `timeout`) for the acknowledgements of events emitted earlier.
    pub async fn settle_events(&self, timeout: Duration) {
        self.events.close();
        if tokio::time::timeout(timeout, self.events.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = self.events.len(),
                "shutting down with event acknowledgements outstanding"
            );
        }
    }

    /// Publishes an outcome and waits for JetStream's acknowledgement. Events never block
    /// mail: a failure is logged, not returned.
    pub async fn publish_event(&self, event: Event) {
        let subject = event_subject(&event.account, event.kind());
        let result = self
            .publish(
                subject,
                Publish::build().payload(event.encode_to_vec().into()),
            )
            .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, queue_id = %event.queue_id, "event not recorded");
        }
    }
}

async fn acked(
    fut: jetstream::context::PublishAckFuture,
    timeout: Duration,
) -> Result<PublishAck, Error> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(ack)) => Ok(ack),
        Ok(Err(e)) => Err(Error::nats(e)),
        Err(_) => Err(Error::Nats(
            "no acknowledgement from JetStream in time".into(),
        )),
    }
}

/// SHA-256 of the message as the client sent it: the one pass over the body that the
/// ingress makes. [`submission_key`] and the stored [`BodyRef`] both use it.
pub fn body_digest(body: &[u8]) -> [u8; 32] {
    Sha256::digest(body).into()
}

/// The de-duplication key of a submission: the same account, envelope and bytes within the
/// duplicate window are one message (a client retrying after a lost `250`). `body` is the
/// [`body_digest`] of the client's bytes.
pub fn submission_key(
    account: &str,
    sender: &str,
    recipients: &[String],
    body: &[u8; 32],
) -> String {
    let mut h = Sha256::new();
    for part in [account.as_bytes(), sender.as_bytes()] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    let mut rcpts: Vec<&String> = recipients.iter().collect();
    rcpts.sort();
    for r in rcpts {
        h.update((r.len() as u64).to_be_bytes());
        h.update(r.as_bytes());
    }
    h.update(body);
    hex::encode(&h.finalize()[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_ignores_recipient_order_but_not_content() {
        let (body, body2) = (body_digest(b"body"), body_digest(b"body2"));
        let a = submission_key("acct", "s@x", &["a@y".into(), "b@z".into()], &body);
        let b = submission_key("acct", "s@x", &["b@z".into(), "a@y".into()], &body);
        let c = submission_key("acct", "s@x", &["a@y".into(), "b@z".into()], &body2);
        let d = submission_key("acct", "s@y", &["a@y".into(), "b@z".into()], &body);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
    }

    #[test]
    fn inline_limit_never_sends_small_bodies_to_the_object_store() {
        assert_eq!(inline_limit(0), DEFAULT_MAX_PAYLOAD - HEADER_ROOM);
        assert_eq!(inline_limit(8 * 1024 * 1024), 8 * 1024 * 1024 - HEADER_ROOM);
        assert!(inline_limit(0) > 100 * 1024);
    }

    #[test]
    fn subjects_keep_tokens_apart() {
        assert_eq!(
            event_subject("ns/app.v2", EventKind::Delivered),
            "herald.events.ns_app_v2.delivered"
        );
        assert_eq!(queue_subject("example.test"), "herald.queue.example.test");
    }
}
