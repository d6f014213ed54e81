//! Herald ingress: the SMTP submission server apps talk to.
//!
//! A session authenticates the app ([`auth`]), checks policy while the dialogue runs so that
//! refusals come at MAIL/RCPT time ([`session`]), and at the end of DATA hands the message to
//! JetStream ([`enqueue`]); `250` is said only after every PubAck. A listener marked
//! `inbound` takes bounces for return-path addresses instead ([`inbound`], [`report`]).

pub mod auth;
pub mod content;
pub mod enqueue;
pub mod footer;
pub mod inbound;
pub mod listener;
pub mod reply;
pub mod report;
pub mod session;

pub use listener::serve;
