//! Telemetry shared by every role: structured logs, and OpenTelemetry traces and metrics
//! exported over OTLP/gRPC.
//!
//! Configured only by the standard variables: `OTEL_EXPORTER_OTLP_ENDPOINT` (or the
//! per-signal `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `..._METRICS_ENDPOINT`),
//! `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` (read by the SDK),
//! `OTEL_METRIC_EXPORT_INTERVAL`, `OTEL_SDK_DISABLED`. With no endpoint set nothing is
//! exported and no exporter exists: spans stay plain `tracing` spans and every metric
//! instrument is a no-op.
//!
//! Logs are JSON unless written to a terminal (`HERALD_LOG_FORMAT=json|text`), filtered by
//! `RUST_LOG` (default `info`); JSON lines carry the current span's fields, including
//! `trace_id` and `span_id` on the spans that start or continue a message's trace.

use std::{
    collections::HashMap,
    io::IsTerminal,
    sync::atomic::{AtomicBool, Ordering},
};

use opentelemetry::{
    Context, global,
    propagation::TextMapPropagator,
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_sdk::{
    Resource, metrics::SdkMeterProvider, propagation::TraceContextPropagator,
    trace::SdkTracerProvider,
};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{EnvFilter, Layer, fmt, prelude::*};

static METRICS_EXPORTED: AtomicBool = AtomicBool::new(false);

/// True when metrics are exported: work done only to feed a metric (polling queue depth)
/// is skipped otherwise.
pub fn metrics_enabled() -> bool {
    METRICS_EXPORTED.load(Ordering::Relaxed)
}

/// Owns the exporters; flushes and stops them when shut down (or dropped).
#[derive(Default)]
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
    registry: Option<prometheus::Registry>,
}

impl Telemetry {
    /// True when spans are exported (an OTLP endpoint is configured).
    pub fn traces_enabled(&self) -> bool {
        self.tracer.is_some()
    }

    /// The Prometheus registry behind `/metrics`, when asked for at [`init`].
    pub fn prometheus_registry(&self) -> Option<prometheus::Registry> {
        self.registry.clone()
    }

    /// Flushes what is buffered and stops the exporters.
    pub fn shutdown(&mut self) {
        if let Some(Err(e)) = self.tracer.take().map(|t| t.shutdown()) {
            eprintln!("telemetry: trace shutdown: {e}");
        }
        if let Some(Err(e)) = self.meter.take().map(|m| m.shutdown()) {
            eprintln!("telemetry: metrics shutdown: {e}");
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn env_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.trim().is_empty())
}

fn resource(service: &str) -> Resource {
    let builder = Resource::builder();
    // OTEL_SERVICE_NAME wins when set (the SDK reads it); otherwise the role's name.
    if env_set("OTEL_SERVICE_NAME") {
        builder.build()
    } else {
        builder.with_service_name(service.to_string()).build()
    }
}

/// Installs the global subscriber, propagator and (when configured) exporters. Call once per
/// process, inside the Tokio runtime; a second call only returns an empty handle.
/// `prometheus` adds a pull reader for the admin endpoint's `/metrics`.
pub fn init(service: &str, prometheus: bool) -> Telemetry {
    global::set_text_map_propagator(TraceContextPropagator::new());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    let traces = !disabled
        && (env_set("OTEL_EXPORTER_OTLP_ENDPOINT")
            || env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"));
    let metrics = !disabled
        && (env_set("OTEL_EXPORTER_OTLP_ENDPOINT")
            || env_set("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"));
    let mut telemetry = Telemetry::default();
    let mut errors = Vec::new();

    if traces {
        match opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
        {
            Ok(exporter) => {
                telemetry.tracer = Some(
                    SdkTracerProvider::builder()
                        .with_batch_exporter(exporter)
                        .with_resource(resource(service))
                        .build(),
                );
            }
            Err(e) => errors.push(format!("OTLP span exporter: {e}")),
        }
    }
    if metrics || prometheus {
        let mut builder = SdkMeterProvider::builder().with_resource(resource(service));
        let mut ok = false;
        if metrics {
            match opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .build()
            {
                Ok(exporter) => {
                    builder = builder.with_periodic_exporter(exporter);
                    ok = true;
                }
                Err(e) => errors.push(format!("OTLP metric exporter: {e}")),
            }
        }
        if prometheus {
            let registry = prometheus::Registry::new();
            match opentelemetry_prometheus::exporter()
                .with_registry(registry.clone())
                .build()
            {
                Ok(reader) => {
                    builder = builder.with_reader(reader);
                    telemetry.registry = Some(registry);
                    ok = true;
                }
                Err(e) => errors.push(format!("Prometheus exporter: {e}")),
            }
        }
        if ok {
            let provider = builder.build();
            global::set_meter_provider(provider.clone());
            METRICS_EXPORTED.store(true, Ordering::Relaxed);
            telemetry.meter = Some(provider);
        }
    }
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match std::env::var("HERALD_LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("text") => false,
        _ => !std::io::stderr().is_terminal(),
    };
    let logs = if json {
        fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        fmt::layer().with_writer(std::io::stderr).boxed()
    };
    let otel = telemetry
        .tracer
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("herald")));
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(otel)
        .try_init()
        .is_ok();
    for e in errors {
        tracing::error!(error = %e, "telemetry exporter not started");
    }
    if installed {
        tracing::info!(
            service,
            traces = telemetry.tracer.is_some(),
            metrics = metrics && telemetry.meter.is_some(),
            prometheus = telemetry.registry.is_some(),
            "telemetry initialised"
        );
        telemetry
    } else {
        Telemetry::default()
    }
}

/// The W3C `traceparent` of `span`, to carry a trace across the queue; `None` when the
/// span is not recorded by OpenTelemetry.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove("traceparent")
}

/// Makes `span` a child of the trace in `traceparent` (ignored when empty or invalid).
pub fn continue_trace(span: &tracing::Span, traceparent: &str) {
    if traceparent.is_empty() {
        return;
    }
    let carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let cx: Context = TraceContextPropagator::new().extract(&carrier);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// The trace id of `span` in hex, for log lines; `None` without OpenTelemetry.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// The span id of `span` in hex, for log lines; `None` without OpenTelemetry.
pub fn span_id(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.span_id().to_string())
}
