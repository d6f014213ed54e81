//! The delivery worker: a durable JetStream pull consumer, a bounded number of entries in
//! flight, outcomes turned into acks, retries and events.

use std::{sync::Arc, time::Duration};

use async_nats::jetstream::{AckKind, Message, consumer::pull};
use futures::StreamExt;
use herald_core::{
    Error as CoreError,
    admin::Health,
    bounce,
    config::Config,
    envelope::{Event, EventKind, QueueEntry, Recipient},
    metrics::DeliveryMetrics,
    queue::{QUEUE_STREAM, QUEUE_SUBJECTS, Queue, TRACEPARENT},
    resources::ResourceSource,
    suppression::Suppression,
    telemetry,
};
use opentelemetry::KeyValue;
use prost::Message as _;
use rand::Rng;
use tokio::{
    sync::{Semaphore, watch},
    task::JoinSet,
};
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::{
    attempt::{Attempt, Deliverer, Delivery, Outcome},
    dsn,
    egress::Unavailable,
    shaping::SharedState,
};

/// Name of the durable consumer all delivery pods share.
pub const CONSUMER: &str = "delivery";

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error("DNS resolver: {0}")]
    Resolver(String),
    #[error("JetStream consumer: {0}")]
    Consumer(String),
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Delay before retry number `attempt` (1-based): `initial` doubling up to `max`, with
/// ±10 % jitter so that entries deferred together do not come back together.
pub fn backoff(config: &Config, attempt: u32) -> Duration {
    let r = &config.delivery.retry;
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(30));
    let base = r.initial.saturating_mul(factor).min(r.max);
    let jitter = rand::rng().random_range(0.9..1.1);
    base.mul_f64(jitter)
}

/// Pulls and delivers until `shutdown` turns true; then stops pulling and lets in-flight
/// entries finish (what does not finish is redelivered by JetStream after the ack wait).
pub async fn run(
    config: Arc<Config>,
    resources: Arc<dyn ResourceSource>,
    queue: Queue,
    mut shutdown: watch::Receiver<bool>,
    health: Arc<Health>,
) -> Result<(), DeliveryError> {
    let state = SharedState::setup(
        queue.jetstream(),
        config.nats.replicas,
        config.delivery.shaping.lease_ttl,
        config.delivery.shaping.reputation_half_life,
    )
    .await
    .map_err(|e| DeliveryError::Consumer(e.to_string()))?;
    let deliverer = Arc::new(
        Deliverer::new(config.clone(), resources, state.clone())
            .map_err(DeliveryError::Resolver)?,
    );
    // Reputation outcomes are written in batches: one CAS per (source, provider) every few
    // seconds rather than one per message.
    let flusher = {
        let state = state.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                state.flush_reputation().await;
            }
        })
    };
    let concurrency = config.delivery.concurrency.max(1);
    let stream = queue
        .jetstream()
        .get_stream(QUEUE_STREAM)
        .await
        .map_err(|e| DeliveryError::Consumer(e.to_string()))?;
    // Create or update: the filter keeps waiting schedules (herald.schedule.>) away from
    // workers; they come back on herald.queue.> when due.
    let consumer: async_nats::jetstream::consumer::PullConsumer = stream
        .create_consumer(pull::Config {
            durable_name: Some(CONSUMER.into()),
            filter_subject: QUEUE_SUBJECTS.into(),
            description: Some("Herald delivery workers".into()),
            ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
            ack_wait: config.delivery.ack_wait,
            max_deliver: -1,
            max_ack_pending: (concurrency * 64) as i64,
            ..Default::default()
        })
        .await
        .map_err(|e| DeliveryError::Consumer(e.to_string()))?;
    info!(concurrency, "delivery worker pulling");
    health.set_ready(true);
    let _queue_gauges = telemetry::metrics_enabled().then(|| watch_queue(consumer.clone()));
    let _source_gauges =
        telemetry::metrics_enabled().then(|| watch_sources(&config, state.clone()));

    // Pull only as many entries as there are free slots: an entry fetched but left waiting
    // in a local buffer would run out its ack wait and be delivered twice.
    let permits = Arc::new(Semaphore::new(concurrency));
    let worker = Arc::new(Worker {
        suppression: Suppression::setup(
            queue.jetstream(),
            config.nats.replicas,
            config.delivery.suppression_ttl,
        )
        .await?,
        config: config.clone(),
        queue: queue.clone(),
        deliverer: deliverer.clone(),
        metrics: DeliveryMetrics::new(),
    });
    let mut in_flight = JoinSet::new();
    'pull: loop {
        while in_flight.try_join_next().is_some() {}
        let first = tokio::select! {
            _ = shutdown.changed() => break 'pull,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break 'pull },
        };
        let wanted = permits.available_permits() + 1;
        let batch = consumer
            .batch()
            .max_messages(wanted)
            .expires(Duration::from_secs(2))
            .messages()
            .await;
        let mut batch = match batch {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "pull failed; retrying");
                drop(first);
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let mut permit = Some(first);
        loop {
            let next = tokio::select! {
                _ = shutdown.changed() => break 'pull,
                m = batch.next() => m,
            };
            let msg = match next {
                Some(Ok(msg)) => msg,
                Some(Err(e)) => {
                    warn!(error = %e, "pull failed; retrying");
                    break;
                }
                None => break,
            };
            let p = match permit.take() {
                Some(p) => p,
                None => match permits.clone().try_acquire_owned() {
                    Ok(p) => p,
                    // Cannot happen (we asked for no more than the free slots), but never
                    // drop an entry: work on it anyway.
                    Err(_) => match permits.clone().acquire_owned().await {
                        Ok(p) => p,
                        Err(_) => break 'pull,
                    },
                },
            };
            let worker = worker.clone();
            in_flight.spawn(async move {
                worker.handle(msg).await;
                drop(p);
            });
        }
    }
    health.set_ready(false);
    info!(
        in_flight = in_flight.len(),
        "delivery draining: no new entries pulled"
    );
    while in_flight.join_next().await.is_some() {}
    deliverer.close_idle().await;
    flusher.abort();
    state.flush_reputation().await;
    queue.settle_events(Duration::from_secs(5)).await;
    Ok(())
}

/// Counts a shaping rule that fired.
pub fn count_rule(rule: &str, action: herald_core::egress::RuleAction) {
    let action = match action {
        herald_core::egress::RuleAction::Suspend => "suspend",
        herald_core::egress::RuleAction::SuspendProvider => "suspend_provider",
        herald_core::egress::RuleAction::CutRate => "cut_rate",
        herald_core::egress::RuleAction::Bounce => "bounce",
    };
    static COUNTER: std::sync::OnceLock<opentelemetry::metrics::Counter<u64>> =
        std::sync::OnceLock::new();
    COUNTER
        .get_or_init(|| {
            opentelemetry::global::meter("herald.delivery")
                .u64_counter("herald.delivery.shaping.actions")
                .with_description("Traffic-shaping rules that fired, by rule and action")
                .with_unit("{action}")
                .build()
        })
        .add(
            1,
            &[
                KeyValue::new("rule", rule.to_string()),
                KeyValue::new("action", action),
            ],
        );
}

/// Queue depth and consumer lag as gauges, polled from JetStream every 10 s. The returned
/// instruments must stay alive for their callbacks to run.
fn watch_queue(
    consumer: async_nats::jetstream::consumer::PullConsumer,
) -> Vec<opentelemetry::metrics::ObservableGauge<u64>> {
    use std::sync::atomic::{AtomicU64, Ordering};
    let pending = Arc::new(AtomicU64::new(0));
    let ack_pending = Arc::new(AtomicU64::new(0));
    let redelivered = Arc::new(AtomicU64::new(0));
    {
        let (pending, ack_pending, redelivered) =
            (pending.clone(), ack_pending.clone(), redelivered.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            loop {
                tick.tick().await;
                match consumer.get_info().await {
                    Ok(info) => {
                        pending.store(info.num_pending, Ordering::Relaxed);
                        ack_pending.store(info.num_ack_pending as u64, Ordering::Relaxed);
                        redelivered.store(info.num_redelivered as u64, Ordering::Relaxed);
                    }
                    Err(e) => warn!(error = %e, "consumer info unavailable for queue metrics"),
                }
            }
        });
    }
    let meter = opentelemetry::global::meter("herald.delivery");
    let gauge = |name: &'static str, desc: &'static str, v: Arc<AtomicU64>| {
        meter
            .u64_observable_gauge(name)
            .with_description(desc)
            .with_unit("{entry}")
            .with_callback(move |o| o.observe(v.load(Ordering::Relaxed), &[]))
            .build()
    };
    vec![
        gauge(
            "herald.queue.pending",
            "Queue entries not yet handed to any worker (consumer lag)",
            pending,
        ),
        gauge(
            "herald.queue.ack_pending",
            "Queue entries handed to workers and not yet acknowledged",
            ack_pending,
        ),
        gauge(
            "herald.queue.redelivered",
            "Queue entries delivered to workers more than once",
            redelivered,
        ),
    ]
}

/// Reputation score per (source, provider) and today's warm-up cap per warming source, as
/// this pod last saw them. The instruments must stay alive for their callbacks to run.
fn watch_sources(
    config: &Config,
    state: SharedState,
) -> Vec<opentelemetry::metrics::ObservableGauge<f64>> {
    let names: std::collections::HashMap<String, String> = config
        .delivery
        .sources
        .iter()
        .map(|s| {
            (
                crate::shaping::token(&s.address.to_string()),
                s.name.clone(),
            )
        })
        .collect();
    let name_of = move |key: &str| names.get(key).cloned().unwrap_or_else(|| key.to_string());
    let meter = opentelemetry::global::meter("herald.delivery");
    let score = {
        let (state, name_of) = (state.clone(), name_of.clone());
        meter
            .f64_observable_gauge("herald.delivery.source.reputation")
            .with_description("Reputation score (0..1) of a source at a mailbox provider")
            .with_unit("1")
            .with_callback(move |o| {
                for (source, provider, score) in state.scores_snapshot() {
                    o.observe(
                        score,
                        &[
                            KeyValue::new("source", name_of(&source)),
                            KeyValue::new("provider", provider),
                        ],
                    );
                }
            })
            .build()
    };
    let schedule = config.delivery.warmup.schedule.clone();
    let cap = meter
        .f64_observable_gauge("herald.delivery.source.warmup.cap")
        .with_description("Today's warm-up cap per provider of a warming source (absent once warm)")
        .with_unit("{message}")
        .with_callback(move |o| {
            for (source, cap) in state.warmup_snapshot(&schedule) {
                if let Some(cap) = cap {
                    o.observe(cap as f64, &[KeyValue::new("source", name_of(&source))]);
                }
            }
        })
        .build();
    vec![score, cap]
}

/// What every in-flight entry of a worker shares.
struct Worker {
    config: Arc<Config>,
    queue: Queue,
    deliverer: Arc<Deliverer>,
    metrics: DeliveryMetrics,
    suppression: Suppression,
}

impl Worker {
    async fn handle(&self, msg: Message) {
        let entry = match QueueEntry::decode(msg.payload.clone()) {
            Ok(e) => e,
            Err(e) => {
                // Nothing can ever read it: keeping it would only loop.
                error!(subject = %msg.subject, error = %e, "undecodable queue entry dropped");
                let _ = msg.ack_with(AckKind::Term).await;
                return;
            }
        };
        let delivered = msg.info().map(|i| i.delivered).unwrap_or(1).max(1) as u32;
        let attempt = entry.attempt + delivered;
        // One span per delivery attempt, a child of the ingress transaction that queued the
        // entry: a message deferred once shows two attempts in its trace.
        let span = info_span!(
            "delivery.attempt",
            otel.kind = "consumer",
            messaging.system = "nats",
            messaging.operation.type = "process",
            messaging.destination.name = %msg.subject,
            messaging.message.id = %entry.id,
            herald.domain = %entry.domain,
            herald.attempt = attempt,
            herald.outcome = tracing::field::Empty,
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
        );
        let traceparent = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(TRACEPARENT))
            .map(|v| v.as_str().to_string())
            .unwrap_or_else(|| entry.traceparent.clone());
        telemetry::continue_trace(&span, &traceparent);
        if let Some(id) = telemetry::trace_id(&span) {
            span.record("trace_id", id.as_str());
        }
        if let Some(id) = telemetry::span_id(&span) {
            span.record("span_id", id.as_str());
        }
        self.attempt(msg, entry, attempt).instrument(span).await
    }

    async fn attempt(&self, msg: Message, mut entry: QueueEntry, attempt: u32) {
        let now = now_unix();
        if entry.not_before > now {
            // Schedules fire on time; this only guards against an early copy.
            let wait = Duration::from_secs((entry.not_before - now) as u64);
            let _ = msg.ack_with(AckKind::Nak(Some(wait))).await;
            return;
        }
        // Hard-bounced recipients of this account are not tried again.
        let mut suppressed = Vec::new();
        let mut keep = Vec::new();
        for r in std::mem::take(&mut entry.recipients) {
            match self.suppression.reason(&entry.account, &r.address).await {
                Ok(Some(reason)) => suppressed.push((r.address.clone(), reason)),
                Ok(None) => keep.push(r),
                Err(e) => {
                    warn!(error = %e, "suppression list unavailable; trying the recipient");
                    keep.push(r);
                }
            }
        }
        entry.recipients = keep;
        if !suppressed.is_empty() {
            info!(count = suppressed.len(), "suppressed recipients skipped");
            let none = Attempt::all(&entry, Outcome::Deferred(String::new()));
            self.event(
                &entry,
                EventKind::Suppressed,
                &suppressed,
                &none,
                attempt,
                "",
            )
            .await;
        }
        if entry.recipients.is_empty() {
            self.done(&msg, &entry).await;
            return;
        }
        let Some(body_ref) = entry.body.as_ref() else {
            let result = Attempt::all(&entry, Outcome::Failed("5.3.0 entry has no body".into()));
            self.finish(&msg, &entry, attempt, &result, None).await;
            return;
        };
        let body = match self.queue.load_body(body_ref).await {
            Ok(b) => b,
            Err(CoreError::BodyMissing(_)) => {
                let result = Attempt::all(
                    &entry,
                    Outcome::Failed("4.4.7 message body expired from the store".into()),
                );
                self.finish(&msg, &entry, attempt, &result, None).await;
                return;
            }
            Err(e) => {
                warn!(error = %e, "body unavailable; retrying soon");
                let _ = msg
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(5))))
                    .await;
                return;
            }
        };
        // Keep the entry ours while the remote host takes its time.
        let progress = async {
            let mut tick = tokio::time::interval(self.config.delivery.ack_wait / 2);
            tick.tick().await;
            loop {
                tick.tick().await;
                let _ = msg.ack_with(AckKind::Progress).await;
            }
        };
        let started = std::time::Instant::now();
        let delivery = tokio::select! {
            r = self.deliverer.attempt(&entry, &body) => r,
            _ = progress => unreachable!("progress loop never ends"),
        };
        match delivery {
            Delivery::Done(mut result) => {
                result.duration = started.elapsed();
                self.finish(&msg, &entry, attempt, &result, Some(&body))
                    .await
            }
            Delivery::Wait(why) => self.wait(&msg, &entry, attempt, why).await,
        }
    }

    /// No source may send to the entry's site now (suspended, saturated, at its warm-up
    /// cap): the entry goes back to the queue for later without counting as an attempt,
    /// and the worker's slot is free for other sites at once.
    async fn wait(&self, msg: &Message, entry: &QueueEntry, attempt: u32, why: Unavailable) {
        let now_ms = crate::shaping::now_ms();
        // A saturated site: each further wait of this entry pauses twice as long (so a deep
        // backlog for one site does not churn the queue), jittered so they spread out.
        let saturated = matches!(why.kind, "busy" | "connections" | "rate");
        let pause = if saturated {
            let max = self.config.delivery.shaping.wait_backoff_max.as_millis() as f64;
            let base = (250.0 * 2f64.powi(entry.throttle_waits.min(20) as i32)).min(max);
            (base * rand::rng().random_range(0.5..1.5)) as i64
        } else {
            0
        };
        let due = why.until_ms.max(now_ms + pause).max(now_ms + 1000);
        let not_before = (due + 999).div_euclid(1000);
        // Past the lifetime, waiting longer would only delay the bounce.
        let expires = entry.received_at + self.config.nats.queue_lifetime.as_secs() as i64;
        if not_before > expires {
            let result = Attempt::all(
                entry,
                Outcome::Deferred(format!("not sent before expiry: {}", why.reason)),
            );
            self.finish(msg, entry, attempt, &result, None).await;
            return;
        }
        tracing::Span::current().record("herald.outcome", "throttled");
        debug!(reason = %why.reason, wait_ms = due - now_ms, "entry waits for its site's throttles");
        self.metrics
            .throttled
            .add(1, &[KeyValue::new("reason", why.kind)]);
        let later = QueueEntry {
            attempt: attempt.saturating_sub(1),
            not_before,
            throttle_waits: entry.throttle_waits.saturating_add(1),
            ..entry.clone()
        };
        let id = format!("{}.{}.w{}", entry.id, entry.domain, ulid::Ulid::new());
        match self
            .queue
            .schedule_entry(&later, not_before, Some(id))
            .await
        {
            Ok(_) => {
                if let Err(e) = msg.double_ack().await {
                    warn!(error = %e, "ack not confirmed");
                }
            }
            Err(e) => {
                warn!(error = %e, "wait not scheduled; the entry comes back by redelivery");
                let _ = msg
                    .ack_with(AckKind::Nak(Some(Duration::from_millis(
                        (due - now_ms).max(1000) as u64,
                    ))))
                    .await;
            }
        }
    }

    /// One event per outcome kind of an attempt, with where it went and how long it took.
    async fn event(
        &self,
        entry: &QueueEntry,
        kind: EventKind,
        list: &[(String, String)],
        result: &Attempt,
        attempt: u32,
        bounce_class: &str,
    ) {
        let first = list.first().map(|(_, w)| w.as_str()).unwrap_or_default();
        let code = first.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
        let enhanced = first
            .split_whitespace()
            .nth(if code > 0 { 1 } else { 0 })
            .filter(|w| w.split('.').count() == 3 && w.split('.').all(|p| p.parse::<u16>().is_ok()))
            .unwrap_or_default();
        let event = Event {
            kind: kind as i32,
            queue_id: entry.id.clone(),
            account: entry.account.clone(),
            sender: entry.sender.clone(),
            recipients: list.iter().map(|(r, _)| r.clone()).collect(),
            domain: entry.domain.clone(),
            remote_host: result.remote_host.clone(),
            reply_text: first.to_string(),
            reply_code: code,
            enhanced_code: enhanced.to_string(),
            attempt,
            at: now_unix(),
            message_id: entry.message_id.clone(),
            tls: result.tls,
            bounce_class: bounce_class.to_string(),
            source_ip: result.source_ip.clone(),
            site: result.site.clone(),
            duration_ms: result.duration.as_millis() as u64,
            size: entry.body.as_ref().map(|b| b.size).unwrap_or(0),
        };
        // Sent in order with what follows, acknowledged apart: the worker moves on.
        self.queue.emit_event(event).await;
    }

    /// Every recipient of the entry is finished: account for it and acknowledge.
    async fn done(&self, msg: &Message, entry: &QueueEntry) {
        if let Err(e) = self.queue.finish_domain(entry).await {
            warn!(error = %e, "pending record not updated");
        }
        if let Err(e) = msg.double_ack().await {
            // Not acked: JetStream redelivers it, the worst case is one duplicate.
            warn!(error = %e, "ack not confirmed");
        }
    }

    /// Turns outcomes into events, bounces, suppressions and the entry's fate: acknowledged
    /// when every recipient is finished; the deferred ones come back as a scheduled entry.
    async fn finish(
        &self,
        msg: &Message,
        entry: &QueueEntry,
        attempt: u32,
        result: &Attempt,
        body: Option<&[u8]>,
    ) {
        let config = &self.config;
        let now = now_unix();
        let delay = backoff(config, attempt);
        let expires = entry.received_at + config.nats.queue_lifetime.as_secs() as i64;
        let mut delivered = Vec::new();
        let mut deferred = Vec::new();
        let mut failed = Vec::new();
        for (rcpt, outcome) in &result.outcomes {
            match outcome {
                Outcome::Delivered(r) => delivered.push((rcpt.clone(), r.to_string())),
                // The next try would come after the message's lifetime: it fails now.
                Outcome::Deferred(why) if now + delay.as_secs() as i64 > expires => failed.push((
                    rcpt.clone(),
                    format!(
                        "4.4.7 message expired after {} hours in the queue; last error: {why}",
                        config.nats.queue_lifetime.as_secs() / 3600
                    ),
                )),
                Outcome::Deferred(why) => deferred.push((rcpt.clone(), why.clone())),
                Outcome::Failed(why) => failed.push((rcpt.clone(), why.clone())),
            }
        }
        for (rcpt, reply) in &delivered {
            info!(rcpt = %rcpt, remote = %result.remote_host, source = %result.source_ip, tls = result.tls, reply = %reply, "delivered");
        }
        for (rcpt, why) in &failed {
            warn!(rcpt = %rcpt, remote = %result.remote_host, reason = %why, "permanent failure");
        }
        for (rcpt, why) in &deferred {
            info!(rcpt = %rcpt, remote = %result.remote_host, reason = %why, retry_in = ?delay, "deferred");
        }
        let outcome = match (delivered.is_empty(), deferred.is_empty(), failed.is_empty()) {
            (false, true, true) => "delivered",
            (true, false, true) => "deferred",
            (true, true, false) => "failed",
            _ => "mixed",
        };
        tracing::Span::current().record("herald.outcome", outcome);
        // Everything delivered: acknowledge before anything else, since a worker dying
        // between the remote 250 and the ack is what makes duplicates.
        let acked_early = deferred.is_empty() && failed.is_empty();
        if acked_early && let Err(e) = msg.double_ack().await {
            warn!(error = %e, "ack not confirmed");
        }
        // Sites and sources, not domains: bounded cardinality, and what an operator steers.
        let site = KeyValue::new(
            "site",
            if result.site.is_empty() {
                entry.domain.clone()
            } else {
                result.site.clone()
            },
        );
        let source = KeyValue::new(
            "source",
            if result.source_ip.is_empty() {
                "default".to_string()
            } else {
                result.source_ip.clone()
            },
        );
        self.metrics.attempts.add(
            1,
            &[
                KeyValue::new("outcome", outcome),
                site.clone(),
                source.clone(),
            ],
        );
        for (kind, n) in [
            ("delivered", delivered.len()),
            ("deferred", deferred.len()),
            ("failed", failed.len()),
        ] {
            if n > 0 {
                self.metrics.recipients.add(
                    n as u64,
                    &[KeyValue::new("outcome", kind), site.clone(), source.clone()],
                );
            }
        }
        if !delivered.is_empty() {
            let waited = (now - entry.received_at).max(0) as f64;
            self.metrics.latency.record(waited, &[site]);
            self.event(entry, EventKind::Delivered, &delivered, result, attempt, "")
                .await;
        }
        if !deferred.is_empty() {
            self.event(entry, EventKind::Deferred, &deferred, result, attempt, "")
                .await;
        }
        if !failed.is_empty() {
            self.bounce(entry, &failed, result, attempt, body).await;
        }

        if acked_early {
            if let Err(e) = self.queue.finish_domain(entry).await {
                warn!(error = %e, "pending record not updated");
            }
            return;
        }
        if deferred.is_empty() {
            self.done(msg, entry).await;
            return;
        }
        let warn_now = config.delivery.delay_warning.is_some_and(|after| {
            !entry.delay_warned && now - entry.received_at >= after.as_secs() as i64
        });
        if warn_now {
            self.warn_delay(entry, &deferred, result, attempt, body, expires)
                .await;
        }
        // Only the deferred recipients come back, as a schedule due after the backoff.
        let retry = QueueEntry {
            recipients: entry
                .recipients
                .iter()
                .filter(|r| deferred.iter().any(|(d, _)| d == &r.address))
                .cloned()
                .collect::<Vec<Recipient>>(),
            attempt,
            // Rounded up: schedules fire on whole seconds, and a retry must never come
            // before its backoff has passed.
            not_before: (crate::shaping::now_ms() + delay.as_millis() as i64 + 999)
                .div_euclid(1000),
            delay_warned: entry.delay_warned || warn_now,
            throttle_waits: 0,
            ..entry.clone()
        };
        match self
            .queue
            .schedule_entry(
                &retry,
                retry.not_before,
                Some(format!("{}.{}.a{attempt}", entry.id, entry.domain)),
            )
            .await
        {
            Ok(_) => {
                if let Err(e) = msg.double_ack().await {
                    warn!(error = %e, "ack not confirmed");
                }
            }
            Err(e) => {
                warn!(error = %e, "retry not scheduled; the whole entry comes back after the backoff");
                let _ = msg.ack_with(AckKind::Nak(Some(delay))).await;
            }
        }
    }

    /// Failed recipients: events with their class (`expired` for the queue lifetime), hard
    /// bounces suppressed, one DSN to the sender (never for the null sender: a bounce does
    /// not bounce).
    async fn bounce(
        &self,
        entry: &QueueEntry,
        failed: &[(String, String)],
        result: &Attempt,
        attempt: u32,
        body: Option<&[u8]>,
    ) {
        let mut report = Vec::new();
        for (rcpt, why) in failed {
            let status = bounce::status_of(why);
            let class = bounce::classify(&status, why);
            let kind = if class == "expired" {
                EventKind::Expired
            } else {
                EventKind::Bounced
            };
            self.event(
                entry,
                kind,
                &[(rcpt.clone(), why.clone())],
                result,
                attempt,
                class,
            )
            .await;
            if bounce::suppresses(class)
                && let Err(e) = self.suppression.add(&entry.account, rcpt, why).await
            {
                warn!(error = %e, rcpt = %rcpt, "not added to the suppression list");
            }
            report.push(self.dsn_line(rcpt, status, why, result));
        }
        self.send_dsn(entry, &report, body, None).await;
    }

    fn dsn_line(&self, rcpt: &str, status: String, why: &str, result: &Attempt) -> dsn::Failed {
        dsn::Failed {
            recipient: rcpt.to_string(),
            status,
            diagnostic: why.to_string(),
            remote_mta: result
                .remote_host
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string(),
        }
    }

    /// A delay warning (RFC 3464 `Action: delayed`) for recipients still deferred after
    /// `delivery.delay_warning`; sent once per entry.
    async fn warn_delay(
        &self,
        entry: &QueueEntry,
        deferred: &[(String, String)],
        result: &Attempt,
        attempt: u32,
        body: Option<&[u8]>,
        expires: i64,
    ) {
        let report: Vec<dsn::Failed> = deferred
            .iter()
            .map(|(rcpt, why)| {
                let status = bounce::status_of(why);
                // A deferral's status is 4.x.x; a reply without one reads as 4.0.0.
                let status = if status.starts_with('4') {
                    status
                } else {
                    "4.0.0".to_string()
                };
                self.dsn_line(rcpt, status, why, result)
            })
            .collect();
        self.event(entry, EventKind::Delayed, deferred, result, attempt, "")
            .await;
        self.send_dsn(entry, &report, body, Some(expires)).await;
    }

    /// Builds a DSN and queues it to the envelope sender, from the sender's MailDomain.
    async fn send_dsn(
        &self,
        entry: &QueueEntry,
        report: &[dsn::Failed],
        body: Option<&[u8]>,
        delayed_until: Option<i64>,
    ) {
        if entry.sender.is_empty() {
            return;
        }
        let tag = if delayed_until.is_some() {
            "delay"
        } else {
            "bounce"
        };
        let span = info_span!(
            "dsn.generate",
            herald.dsn.kind = tag,
            herald.recipients = report.len(),
            messaging.message.id = %entry.id,
            herald.dsn.id = tracing::field::Empty,
        );
        self.build_dsn(entry, report, body, delayed_until, tag)
            .instrument(span)
            .await
    }

    async fn build_dsn(
        &self,
        entry: &QueueEntry,
        report: &[dsn::Failed],
        body: Option<&[u8]>,
        delayed_until: Option<i64>,
        tag: &str,
    ) {
        let resources = self.deliverer.resources().current();
        let from_domain = resources
            .domain(&entry.sender_domain)
            .map(|d| d.domain.to_string())
            .unwrap_or_else(|| {
                entry
                    .sender
                    .rsplit_once('@')
                    .map(|(_, d)| d.to_string())
                    .unwrap_or_default()
            });
        let now = now_unix();
        let message = dsn::build(&dsn::Report {
            reporting_mta: &self.config.delivery.hostname,
            from_domain: &from_domain,
            to: &entry.sender,
            queue_id: &entry.id,
            arrival: entry.received_at,
            now,
            failed: report,
            original_headers: body.map(dsn::header_block).unwrap_or_default(),
            delayed_until,
        });
        if let Err(e) = self.queue_bounce(entry, message, now, tag).await {
            // The failure is in the events either way; the DSN is best effort.
            error!(error = %e, "DSN not queued");
        }
    }

    /// Queues a DSN like any message: body once, one entry to the sender's domain, from
    /// the null sender, signed with the original sender's MailDomain key.
    async fn queue_bounce(
        &self,
        entry: &QueueEntry,
        message: Vec<u8>,
        now: i64,
        tag: &str,
    ) -> Result<(), CoreError> {
        let Some((_, domain)) = entry.sender.rsplit_once('@') else {
            return Ok(());
        };
        let domain = domain.to_lowercase();
        let id = herald_core::types::QueueId::generate();
        let size = message.len() as u64;
        let mut bounce = QueueEntry {
            id: id.to_string(),
            account: entry.account.clone(),
            sender: String::new(),
            domain,
            recipients: vec![Recipient {
                address: entry.sender.clone(),
                orcpt: String::new(),
                notify: 0,
            }],
            body: None,
            attempt: 0,
            not_before: 0,
            received_at: now,
            client_ip: String::new(),
            sender_domain: entry.sender_domain.clone(),
            smtputf8: false,
            eight_bit: false,
            traceparent: entry.traceparent.clone(),
            message_id: format!("<{}.{tag}@{}>", entry.id, self.config.delivery.hostname),
            delay_warned: true,
            // From the null sender: never rewritten.
            return_path: String::new(),
            throttle_waits: 0,
            sole_domain: true,
        };
        bounce.body = Some(
            self.queue
                .place_body(&bounce, message.into(), String::new())
                .await?,
        );
        self.queue
            .publish_entry(&bounce, Some(format!("{}.{tag}.{}", entry.id, now)))
            .await?;
        tracing::Span::current().record("herald.dsn.id", id.as_str());
        info!(dsn_id = %id, size, to = %entry.sender, kind = tag, "DSN queued");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps_with_jitter() {
        let mut config = Config::default();
        config.delivery.retry.initial = Duration::from_secs(100);
        config.delivery.retry.max = Duration::from_secs(350);
        let secs = |n| backoff(&config, n).as_secs_f64();
        assert!((90.0..=110.0).contains(&secs(1)));
        assert!((180.0..=220.0).contains(&secs(2)));
        assert!((315.0..=385.0).contains(&secs(3)));
        assert!((315.0..=385.0).contains(&secs(40)));
    }
}
