//! Herald's reports API (`herald api`): "where is my email?" for operators and apps, read
//! from Herald's state in NATS and served twice, as gRPC (`herald.v1.Reports`,
//! proto/herald/v1/api.proto) and as JSON over HTTP (`/v1/...`, see [`http`]).
//!
//! - a message's events and each recipient's state ([`history`]), from `HERALD_EVENTS`;
//! - an account's outcomes per kind over a window ([`stats`]), from its event subjects;
//! - the account's suppression list, and taking an address off it (`HERALD_SUPPRESSION`);
//! - the queue's depth and the delivery consumer's lag ([`status`]; `herald status` too).
//!
//! Both front-ends call one [`Backend`] and check one bearer token ([`auth`]).

pub mod account;
pub mod auth;
pub mod error;
pub mod grpc;
pub mod history;
pub mod http;
pub mod reports;
pub mod stats;
pub mod status;

/// Generated from proto/herald/v1/api.proto (events are `herald_core::envelope::Event`).
#[allow(clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("herald.v1");
}

use std::{net::SocketAddr, sync::Arc};

use herald_core::{admin::Health, config::Config, queue::Queue};
use tokio::{net::TcpListener, sync::watch};

pub use account::AccountId;
pub use auth::Auth;
pub use error::ApiError;
pub use reports::{Backend, Reports, SuppressionList};
pub use status::{ConsumerStatus, QueueStatus, StatusError, StreamStatus, queue_status};

/// The two listening sockets, bound before anything is served so that a port in use is a
/// start-up error.
pub struct Listeners {
    grpc: TcpListener,
    http: TcpListener,
}

impl Listeners {
    pub async fn bind(grpc: SocketAddr, http: SocketAddr) -> Result<Listeners, ApiError> {
        let bind = |addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ApiError::Bind { addr, source })
        };
        Ok(Listeners {
            grpc: bind(grpc).await?,
            http: bind(http).await?,
        })
    }

    pub fn grpc_addr(&self) -> Result<SocketAddr, ApiError> {
        self.grpc
            .local_addr()
            .map_err(|e| ApiError::Serve(e.to_string()))
    }

    pub fn http_addr(&self) -> Result<SocketAddr, ApiError> {
        self.http
            .local_addr()
            .map_err(|e| ApiError::Serve(e.to_string()))
    }
}

/// Resolves when `shutdown` turns true (or can no longer change).
async fn stopped(mut shutdown: watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|&stop| stop).await;
}

/// Serves both front-ends until `shutdown`; requests in progress are finished first.
pub async fn serve<B: Backend>(
    backend: Arc<B>,
    auth: Auth,
    listeners: Listeners,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ApiError> {
    let http = axum::serve(listeners.http, http::router(backend.clone(), auth.clone()))
        .with_graceful_shutdown(stopped(shutdown.clone()));
    let grpc = tonic::transport::Server::builder()
        .add_service(grpc::service(backend, auth))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listeners.grpc),
            stopped(shutdown),
        );
    let http = async {
        http.await
            .map_err(|e| ApiError::Serve(format!("HTTP: {e}")))
    };
    let grpc = async {
        grpc.await
            .map_err(|e| ApiError::Serve(format!("gRPC: {e}")))
    };
    tokio::try_join!(http, grpc)?;
    Ok(())
}

/// `herald api`: opens the events stream and the suppression bucket, binds both addresses,
/// reports ready, and serves until SIGTERM. `auth` comes from [`Auth::from_config`], checked
/// before anything waits for NATS.
pub async fn run(
    config: Arc<Config>,
    auth: Auth,
    queue: Queue,
    shutdown: watch::Receiver<bool>,
    health: Arc<Health>,
) -> Result<(), ApiError> {
    let reports = Arc::new(Reports::new(&queue, &config).await?);
    let listeners = Listeners::bind(config.api.grpc_addr, config.api.http_addr).await?;
    tracing::info!(
        grpc = %listeners.grpc_addr()?,
        http = %listeners.http_addr()?,
        token = auth.required(),
        "reports API listening"
    );
    health.set_ready(true);
    let draining = {
        let (health, shutdown) = (health.clone(), shutdown.clone());
        async move {
            stopped(shutdown).await;
            // Out of the Service endpoints before the listeners close.
            health.set_ready(false);
        }
    };
    tokio::spawn(draining);
    serve(reports, auth, listeners, shutdown).await
}
