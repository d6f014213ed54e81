//! Helpers shared by the API's integration tests: an HTTP/1.1 client on a bare socket, a
//! gRPC client with or without the token, and the API served on ephemeral ports.

#![allow(dead_code)]

use std::{net::SocketAddr, sync::Arc};

use herald_api::{Auth, Backend, Listeners, proto::reports_client::ReportsClient};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::watch,
};
use tonic::transport::Channel;

pub const TOKEN: &str = "test-token-0123";

/// A running API; stops when dropped.
pub struct Served {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    stop: watch::Sender<bool>,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

pub async fn serve<B: Backend>(backend: Arc<B>, token: Option<&str>) -> Served {
    let listeners = Listeners::bind(
        "127.0.0.1:0".parse().expect("addr"),
        "127.0.0.1:0".parse().expect("addr"),
    )
    .await
    .expect("bind");
    let (http, grpc) = (
        listeners.http_addr().expect("addr"),
        listeners.grpc_addr().expect("addr"),
    );
    let (stop, shutdown) = watch::channel(false);
    let auth = Auth::with_token(token);
    tokio::spawn(async move {
        if let Err(e) = herald_api::serve(backend, auth, listeners, shutdown).await {
            panic!("API stopped: {e}");
        }
    });
    Served { http, grpc, stop }
}

/// Status and body of one request (`Connection: close`).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, serde_json::Value) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("read");
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    let json = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    (status, json)
}

pub async fn grpc(addr: SocketAddr) -> ReportsClient<Channel> {
    ReportsClient::connect(format!("http://{addr}"))
        .await
        .expect("gRPC connect")
}

/// A request carrying `Authorization: Bearer <token>`.
pub fn authed<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("metadata value"),
    );
    r
}
