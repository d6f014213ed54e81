//! Herald delivery: JetStream queue entries to the recipients' MX hosts, DKIM-signed.
//!
//! Direction of the code follows the message: [`worker`] pulls entries, [`attempt`] makes one
//! delivery attempt for an entry, [`route`] finds where to connect ([`route`] asks DNS through
//! explicit nameservers only), [`site`] names the destination its throttles apply to,
//! [`egress`] picks the source address, [`shaping`] holds the throttle, suspension, warm-up
//! and reputation state shared by all pods ([`mirror`] keeps a watched copy of what every
//! message reads), [`rules`] learns from replies, [`reuse`] keeps
//! idle connections, [`dkim`] signs, [`downgrade`] converts 8-bit MIME for old hosts,
//! [`return_path`] picks the envelope sender (VERP for MailDomains with a return path), and
//! [`client`] speaks SMTP to the remote host.

pub mod attempt;
pub mod client;
pub mod dkim;
pub mod downgrade;
pub mod dsn;
pub mod egress;
pub mod mirror;
pub mod return_path;
pub mod reuse;
pub mod route;
pub mod rules;
pub mod shaping;
pub mod site;
pub mod worker;

pub use worker::run;
