//! Herald's shared library: what every role (ingress, delivery, sink, operator, api) agrees on.
//!
//! - [`config`]: the one configuration file, with `HERALD_...` environment overrides.
//! - [`resources`]: `MailDomain` / `SmtpAccount` resource types and the sources that read
//!   them: files, or the Kubernetes API (watchers on the resources and labelled Secrets).
//! - [`queue`]: JetStream streams, buckets and the message body store; [`scan`] reads slices
//!   of them for reports.
//! - [`envelope`]: the protobuf queue entry and events (`proto/herald/v1`).
//! - [`smtp`]: server-side SMTP framing shared by ingress and the sink.
//! - [`verp`], [`return_path`], [`bounce`]: return-path addresses, the record behind each,
//!   and how a failure is classified; shared by delivery and ingress's inbound listener.
//! - [`tls`], [`telemetry`], [`types`].

pub mod account;
pub mod admin;
pub mod bounce;
pub mod config;
pub mod dns;
pub mod egress;
pub mod envelope;
pub mod error;
pub mod limits;
pub mod metrics;
pub mod password;
pub mod queue;
pub mod resources;
pub mod return_path;
pub mod route;
pub mod scan;
pub mod smtp;
pub mod suppression;
pub mod telemetry;
pub mod tls;
pub mod types;
pub mod verp;

pub use error::Error;
