use std::path::PathBuf;

/// Errors of the shared library. Roles map them to SMTP replies or exit messages.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("invalid resource in {path}: {message}")]
    Resource { path: PathBuf, message: String },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("NATS: {0}")]
    Nats(String),
    #[error("message body {0} is not in the store")]
    BodyMissing(String),
    #[error("invalid queue entry: {0}")]
    Envelope(String),
}

impl Error {
    pub fn nats(e: impl std::fmt::Display) -> Self {
        Error::Nats(e.to_string())
    }
}
