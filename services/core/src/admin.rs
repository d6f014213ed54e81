//! The admin HTTP endpoint every role can serve (`admin.addr`): liveness, readiness and a
//! Prometheus scrape of the same metrics that go to OTLP.
//!
//! - `GET /healthz`: 200 while the process runs.
//! - `GET /readyz`: 200 once the role can do its work, 503 before and again from the moment
//!   a drain starts, so load balancers stop sending before sessions are closed.
//! - `GET /metrics`: Prometheus text format.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use tokio::sync::watch;

/// Readiness shared between a role and its admin endpoint.
#[derive(Debug, Default)]
pub struct Health {
    ready: AtomicBool,
}

impl Health {
    pub fn new() -> Arc<Health> {
        Arc::new(Health::default())
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct AdminState {
    health: Arc<Health>,
    registry: Option<prometheus::Registry>,
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    if s.health.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    let Some(registry) = s.registry else {
        return (
            StatusCode::NOT_FOUND,
            String::from("metrics are not enabled\n"),
        );
    };
    let mut out = String::new();
    match prometheus::TextEncoder::new().encode_utf8(&registry.gather(), &mut out) {
        Ok(()) => (StatusCode::OK, out),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("admin endpoint on {addr}: {source}")]
pub struct AdminError {
    addr: SocketAddr,
    source: std::io::Error,
}

/// Binds `addr` and serves until `shutdown` turns true.
pub async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    registry: Option<prometheus::Registry>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), AdminError> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(AdminState { health, registry });
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError { addr, source })?;
    tracing::info!(%addr, "admin endpoint listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|&stop| stop).await;
        })
        .await
        .map_err(|source| AdminError { addr, source })
}
