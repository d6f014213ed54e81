//! Herald delivery: JetStream queue entries to the recipients' MX hosts, DKIM-signed.
//!
//! Direction of the code follows the message: [`worker`] pulls entries, [`attempt`] makes one
//! delivery attempt for an entry, [`route`] finds where to connect ([`route`] asks DNS through
//! explicit nameservers only), [`dkim`] signs, [`client`] speaks SMTP to the remote host.

pub mod attempt;
pub mod client;
pub mod dkim;
pub mod dsn;
pub mod route;
pub mod worker;

pub use worker::run;
