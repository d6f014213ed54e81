//! Metric instruments, one set per role, created from the global meter (no-ops until
//! [`crate::telemetry::init`] installs an exporter). Names and units are listed in
//! docs/observability.md.

use opentelemetry::{
    KeyValue, global,
    metrics::{Counter, Histogram},
};

/// Ingress: connections, authentication, and the fate of each transaction.
#[derive(Clone)]
pub struct IngressMetrics {
    pub connections: Counter<u64>,
    pub auth_failures: Counter<u64>,
    /// `outcome` = accepted | refused, `reason` for refusals.
    pub messages: Counter<u64>,
    pub message_size: Histogram<u64>,
}

impl IngressMetrics {
    pub fn new() -> IngressMetrics {
        let m = global::meter("herald.ingress");
        IngressMetrics {
            connections: m
                .u64_counter("herald.ingress.connections")
                .with_description("SMTP connections accepted")
                .with_unit("{connection}")
                .build(),
            auth_failures: m
                .u64_counter("herald.ingress.auth.failures")
                .with_description("Failed SMTP AUTH attempts")
                .with_unit("{attempt}")
                .build(),
            messages: m
                .u64_counter("herald.ingress.messages")
                .with_description("Transactions accepted or refused, by reason")
                .with_unit("{message}")
                .build(),
            message_size: m
                .u64_histogram("herald.ingress.message.size")
                .with_description("Size of accepted messages")
                .with_unit("By")
                .build(),
        }
    }

    pub fn refused(&self, reason: &'static str) {
        self.messages.add(
            1,
            &[
                KeyValue::new("outcome", "refused"),
                KeyValue::new("reason", reason),
            ],
        );
    }
}

impl Default for IngressMetrics {
    fn default() -> Self {
        IngressMetrics::new()
    }
}

/// Delivery: attempts and recipients by outcome, and how long mail took.
#[derive(Clone)]
pub struct DeliveryMetrics {
    /// Per recipient and attempt: `outcome` = delivered | deferred | failed, `domain`.
    pub recipients: Counter<u64>,
    /// Per attempt of an entry (one connection's worth of work).
    pub attempts: Counter<u64>,
    /// Seconds from acceptance at ingress to the remote 250.
    pub latency: Histogram<f64>,
    /// Entries sent back to wait because their site's throttles said "not now"; `reason`
    /// = suspended | connections | rate | warmup | no_source.
    pub throttled: Counter<u64>,
}

impl DeliveryMetrics {
    pub fn new() -> DeliveryMetrics {
        let m = global::meter("herald.delivery");
        DeliveryMetrics {
            recipients: m
                .u64_counter("herald.delivery.recipients")
                .with_description("Recipient outcomes per attempt")
                .with_unit("{recipient}")
                .build(),
            attempts: m
                .u64_counter("herald.delivery.attempts")
                .with_description("Delivery attempts of queue entries")
                .with_unit("{attempt}")
                .build(),
            latency: m
                .f64_histogram("herald.delivery.latency")
                .with_description("Time from acceptance to delivery")
                .with_unit("s")
                .with_boundaries(vec![
                    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0,
                    86400.0,
                ])
                .build(),
            throttled: m
                .u64_counter("herald.delivery.throttled")
                .with_description("Entries re-queued to wait for their site's throttles")
                .with_unit("{entry}")
                .build(),
        }
    }
}

impl Default for DeliveryMetrics {
    fn default() -> Self {
        DeliveryMetrics::new()
    }
}
