//! Telemetry scenarios: `herald ingress` and `herald delivery` as separate processes export
//! OTLP to an in-process collector (fake-opentelemetry-collector); assertions are on what the
//! collector received. Run inside the private network namespace, like every e2e scenario.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, TcpListener},
    time::{Duration, Instant},
};

use fake_opentelemetry_collector::{ExportedMetric, ExportedSpan, FakeCollectorServer};
use herald_e2e::{Scenario, World};

fn otel_env(collector: &FakeCollectorServer) -> Vec<(String, String)> {
    [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint()),
        ("OTEL_METRIC_EXPORT_INTERVAL", "500".to_string()),
        ("OTEL_BSP_SCHEDULE_DELAY", "200".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Collects spans until `done` holds for what was received, or `timeout`.
fn spans_until(
    rt: &tokio::runtime::Runtime,
    collector: &mut FakeCollectorServer,
    timeout: Duration,
    done: impl Fn(&[ExportedSpan]) -> bool,
) -> Vec<ExportedSpan> {
    let start = Instant::now();
    let mut all = Vec::new();
    while start.elapsed() < timeout && !done(&all) {
        all.extend(rt.block_on(collector.exported_spans(1, Duration::from_millis(500))));
    }
    all
}

/// An attribute's value as exported (the collector shows OTLP values in Debug form).
fn attr<'a>(span: &'a ExportedSpan, key: &str) -> &'a str {
    span.attributes.get(key).map(String::as_str).unwrap_or("")
}

fn has_attr(span: &ExportedSpan, key: &str, value: &str) -> bool {
    attr(span, key).contains(value)
}

fn named<'a>(spans: &'a [ExportedSpan], name: &str) -> Vec<&'a ExportedSpan> {
    spans.iter().filter(|s| s.name == name).collect()
}

fn describe(spans: &[ExportedSpan]) -> String {
    spans
        .iter()
        .map(|s| {
            format!(
                "{} trace={} span={} parent={} attrs={:?}",
                s.name, s.trace_id, s.span_id, s.parent_span_id, s.attributes
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Data points of a sum metric, as (attributes, value); the collector's metric types are
/// private, so they are read through their serde form.
fn counter_points(metrics: &[ExportedMetric], name: &str) -> Vec<(BTreeMap<String, String>, i64)> {
    let mut points = Vec::new();
    for exported in metrics {
        let json = serde_json::to_value(exported).expect("metric serializes");
        for m in json["metrics"].as_array().into_iter().flatten() {
            if m["name"] != name {
                continue;
            }
            for p in m["data"]["Sum"]["data_points"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let attrs = p["attributes"]
                    .as_object()
                    .map(|o| {
                        o.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                            .collect()
                    })
                    .unwrap_or_default();
                let value = p["value"]["AsInt"]
                    .as_i64()
                    .or_else(|| p["value"]["AsDouble"].as_f64().map(|v| v as i64))
                    .unwrap_or(0);
                points.push((attrs, value));
            }
        }
    }
    points
}

/// The largest value seen for `name{outcome=...}` (cumulative temporality: the latest).
fn counter_value(metrics: &[ExportedMetric], name: &str, outcome: &str) -> i64 {
    counter_points(metrics, name)
        .into_iter()
        .filter(|(attrs, _)| attrs.get("outcome").is_some_and(|v| v.contains(outcome)))
        .map(|(_, v)| v)
        .max()
        .unwrap_or(0)
}

#[test]
fn one_trace_follows_a_message_from_submission_to_delivery() {
    herald_e2e::require_netns();
    let rt = runtime();
    let mut collector = rt
        .block_on(FakeCollectorServer::start())
        .expect("collector");
    let world = World::start("otel-trace", &otel_env(&collector));
    let marker = "otel-trace-marker";
    let queue_id = world.submit(marker);
    world.wait_arrival(marker, Duration::from_secs(30));

    let spans = spans_until(&rt, &mut collector, Duration::from_secs(20), |s| {
        // The session span ends only at QUIT, so it may come in a later batch than the
        // transaction; the readiness probe's connection is a session too. Wait for the one
        // the transaction links to.
        let linked_session = s.iter().filter(|t| t.name == "smtp.transaction").any(|t| {
            s.iter()
                .any(|x| x.name == "smtp.session" && t.links.iter().any(|l| l.span_id == x.span_id))
        });
        linked_session
            && s.iter().any(|s| s.name == "delivery.attempt")
            && s.iter().any(|s| s.name == "smtp.client")
    });
    let all = describe(&spans);
    let txn = named(&spans, "smtp.transaction");
    let txn = txn
        .iter()
        .find(|s| has_attr(s, "messaging.message.id", &queue_id))
        .unwrap_or_else(|| {
            panic!(
                "no smtp.transaction span for {queue_id}:\n{all}\n{}",
                world.logs()
            )
        });
    assert!(has_attr(txn, "herald.account", "default/app"), "{all}");
    assert!(has_attr(txn, "client.address", "127."), "{all}");
    assert!(has_attr(txn, "herald.recipients", "1"), "{all}");
    assert!(
        !attr(txn, "messaging.message.body.size").is_empty(),
        "{all}"
    );
    assert!(
        txn.parent_span_id.is_empty(),
        "a message's trace starts at its transaction:\n{all}"
    );
    let session = named(&spans, "smtp.session");
    assert!(
        session
            .iter()
            .any(|s| txn.links.iter().any(|l| l.span_id == s.span_id)),
        "the transaction links to its SMTP session:\n{all}"
    );

    let attempts = named(&spans, "delivery.attempt");
    let attempt = attempts
        .iter()
        .find(|s| s.trace_id == txn.trace_id)
        .unwrap_or_else(|| panic!("no delivery.attempt in trace {}:\n{all}", txn.trace_id));
    assert_eq!(
        attempt.parent_span_id, txn.span_id,
        "attempt is a child of the transaction:\n{all}"
    );
    assert!(has_attr(attempt, "messaging.system", "nats"), "{all}");
    assert!(
        has_attr(attempt, "messaging.message.id", &queue_id),
        "{all}"
    );
    assert!(has_attr(attempt, "herald.outcome", "delivered"), "{all}");
    assert_eq!(attempt.kind, "SPAN_KIND_CONSUMER", "{all}");

    let client = named(&spans, "smtp.client");
    let client = client
        .iter()
        .find(|s| s.parent_span_id == attempt.span_id)
        .unwrap_or_else(|| panic!("no smtp.client under the attempt:\n{all}"));
    assert_eq!(client.trace_id, txn.trace_id);
    assert!(
        has_attr(client, "server.address", "mx1.example.test"),
        "{all}"
    );
    assert!(
        has_attr(client, "network.peer.address", &world.mx.ip().to_string()),
        "{all}"
    );
    assert!(has_attr(client, "herald.smtp.reply_code", "250"), "{all}");
    assert!(
        has_attr(client, "herald.tls", "true"),
        "Postfix offers STARTTLS:\n{all}"
    );
    assert!(!attr(client, "network.local.address").is_empty(), "{all}");

    // JSON log lines lead to the trace: both processes log under the message's trace id.
    for (role, log) in [
        ("ingress", world.ingress.log()),
        ("delivery", world.delivery.log()),
    ] {
        assert!(
            log.contains(&format!("\"trace_id\":\"{}\"", txn.trace_id)),
            "{role} log lines carry the trace id {}:\n{log}",
            txn.trace_id
        );
    }
    assert!(
        world
            .delivery
            .log()
            .contains(&format!("\"span_id\":\"{}\"", attempt.span_id))
    );

    // The delivered-recipients counter moved by exactly one.
    let start = Instant::now();
    let mut metrics = Vec::new();
    let delivered = |metrics: &[ExportedMetric]| {
        counter_value(metrics, "herald.delivery.recipients", "delivered")
    };
    while start.elapsed() < Duration::from_secs(20) && delivered(&metrics) == 0 {
        metrics.extend(rt.block_on(collector.exported_metrics(1, Duration::from_millis(500))));
    }
    assert_eq!(
        delivered(&metrics),
        1,
        "herald.delivery.recipients{{outcome=delivered}}"
    );
    let accepted = counter_value(&metrics, "herald.ingress.messages", "accepted");
    assert_eq!(accepted, 1, "herald.ingress.messages{{outcome=accepted}}");
    // Attempts are counted per site and source IP, the units an operator steers.
    let attempts = counter_points(&metrics, "herald.delivery.attempts");
    let (attrs, n) = attempts
        .iter()
        .find(|(a, _)| a.get("outcome").is_some_and(|o| o.contains("delivered")))
        .unwrap_or_else(|| panic!("no delivered attempt among {attempts:?}"));
    assert_eq!(*n, 1);
    assert!(
        attrs
            .get("site")
            .is_some_and(|s| s.contains("example.test")),
        "{attrs:?}"
    );
    assert!(
        attrs.get("source").is_some_and(|s| s.contains("127.")),
        "{attrs:?}"
    );
}

#[test]
fn deferred_then_delivered_shows_two_attempt_spans_in_one_trace() {
    herald_e2e::require_netns();
    let rt = runtime();
    let mut collector = rt
        .block_on(FakeCollectorServer::start())
        .expect("collector");
    let mut world = World::start("otel-retry", &otel_env(&collector));
    world.mx.stop();
    let queue_id = world.submit("otel-retry-marker");

    let deferred = |s: &ExportedSpan| {
        s.name == "delivery.attempt"
            && has_attr(s, "messaging.message.id", &queue_id)
            && has_attr(s, "herald.outcome", "deferred")
    };
    let mut spans = spans_until(&rt, &mut collector, Duration::from_secs(30), |s| {
        s.iter().any(deferred)
    });
    assert!(
        spans.iter().any(deferred),
        "no deferred attempt:\n{}\n{}",
        describe(&spans),
        world.logs()
    );
    world.mx.start_again();
    world.wait_arrival("otel-retry-marker", Duration::from_secs(30));
    let delivered = |s: &ExportedSpan| {
        s.name == "delivery.attempt"
            && has_attr(s, "messaging.message.id", &queue_id)
            && has_attr(s, "herald.outcome", "delivered")
    };
    spans.extend(spans_until(
        &rt,
        &mut collector,
        Duration::from_secs(20),
        |s| s.iter().any(delivered),
    ));
    let all = describe(&spans);
    let txn = spans
        .iter()
        .find(|s| s.name == "smtp.transaction" && has_attr(s, "messaging.message.id", &queue_id))
        .unwrap_or_else(|| panic!("no transaction span:\n{all}"));
    let first = spans
        .iter()
        .find(|s| deferred(s))
        .expect("deferred attempt");
    let last = spans
        .iter()
        .find(|s| delivered(s))
        .unwrap_or_else(|| panic!("no delivered attempt:\n{all}\n{}", world.logs()));
    for a in [first, last] {
        assert_eq!(
            a.trace_id, txn.trace_id,
            "attempts share the message's trace:\n{all}"
        );
        assert_eq!(
            a.parent_span_id, txn.span_id,
            "attempts are children of the transaction:\n{all}"
        );
    }
    assert_ne!(first.span_id, last.span_id);
    assert!(has_attr(first, "herald.attempt", "1"), "{all}");
}

#[test]
fn without_otel_variables_nothing_connects_to_a_collector() {
    herald_e2e::require_netns();
    // The OTLP default endpoint: an exporter built with defaults would connect here.
    let otlp = TcpListener::bind("127.0.0.1:4317").expect("bind 127.0.0.1:4317");
    otlp.set_nonblocking(true).expect("nonblocking");
    let mut world = World::start("otel-off", &[]);
    world.submit("otel-off-marker");
    world.wait_arrival("otel-off-marker", Duration::from_secs(30));
    // Shutdown is when exporters flush: stop both processes before looking.
    world.ingress.terminate();
    world.delivery.terminate();
    match otlp.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        Ok((_, peer)) => panic!("something connected to the OTLP port from {peer}"),
        Err(e) => panic!("accept: {e}"),
    }
    let logs: BTreeMap<&str, String> = BTreeMap::from([
        ("ingress", world.ingress.log()),
        ("delivery", world.delivery.log()),
    ]);
    for (role, log) in logs {
        assert!(
            log.contains("\"traces\":false") && log.contains("\"metrics\":false"),
            "{role} should report telemetry off:\n{log}"
        );
    }
}

/// A plain HTTP/1.1 GET: (status, body).
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect admin endpoint");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read");
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn admin_endpoint_reports_readiness_and_prometheus_metrics() {
    herald_e2e::require_netns();
    let probe = Scenario::new("admin-addr");
    let admin = SocketAddr::from((probe.ip(), probe.port()));
    let env = vec![("HERALD_ADMIN__ADDR".to_string(), admin.to_string())];
    // Only ingress gets the admin endpoint here (both processes would want the same port).
    let world = World::start_split_env("admin", &env, &[]);
    assert_eq!(http_get(admin, "/healthz").0, 200);
    assert_eq!(
        http_get(admin, "/readyz").0,
        200,
        "ingress is ready once it listens"
    );
    world.submit("admin-marker");
    world.wait_arrival("admin-marker", Duration::from_secs(30));
    let (status, body) = http_get(admin, "/metrics");
    assert_eq!(status, 200);
    let accepted = body
        .lines()
        .find(|l| {
            l.starts_with("herald_ingress_messages_total") && l.contains("outcome=\"accepted\"")
        })
        .unwrap_or_else(|| panic!("no accepted counter in /metrics:\n{body}"));
    assert!(
        accepted.trim_end().ends_with(" 1"),
        "one message accepted: {accepted}"
    );
    assert!(body.contains("herald_ingress_connections_total"), "{body}");
}
