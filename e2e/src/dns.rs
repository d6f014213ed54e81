//! Authoritative test DNS (dnsmasq) on 127.0.0.1:<own port>, private to one scenario.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use crate::process::{Managed, tcp_accepts};
use crate::{Scenario, find_tool, free_port};

/// Records the test nameserver answers. Names under `.test` that are not listed get
/// NXDOMAIN; any other name gets REFUSED (nothing is forwarded anywhere).
#[derive(Clone, Debug, Default)]
pub struct DnsRecords {
    lines: Vec<String>,
}

impl DnsRecords {
    pub fn new() -> DnsRecords {
        DnsRecords::default()
    }

    /// `domain. MX pref host.`
    pub fn mx(mut self, domain: &str, host: &str, pref: u16) -> DnsRecords {
        self.lines.push(format!("mx-host={domain},{host},{pref}"));
        self
    }

    /// `host. A ip`
    pub fn a(mut self, host: &str, ip: Ipv4Addr) -> DnsRecords {
        self.lines.push(format!("host-record={host},{ip}"));
        self
    }

    /// `name. TXT "value"`, split into character-strings of at most 255 bytes (a DKIM
    /// key record of a 2048-bit RSA key is longer than one string may be).
    pub fn txt(mut self, name: &str, value: &str) -> DnsRecords {
        let mut line = format!("txt-record={name}");
        for chunk in split_txt(value) {
            line.push_str(",\"");
            for c in chunk.chars() {
                if c == '"' || c == '\\' {
                    line.push('\\');
                }
                line.push(c);
            }
            line.push('"');
        }
        self.lines.push(line);
        self
    }

    /// A raw dnsmasq configuration line, for anything the helpers do not cover.
    pub fn raw(mut self, line: &str) -> DnsRecords {
        self.lines.push(line.to_string());
        self
    }
}

/// Splits on char boundaries into pieces of at most 255 bytes.
fn split_txt(value: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = value;
    while rest.len() > 255 {
        let mut cut = 255;
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        out.push(&rest[..cut]);
        rest = &rest[cut..];
    }
    out.push(rest);
    out
}

/// dnsmasq serving [`DnsRecords`] on 127.0.0.1:PORT (UDP and TCP), killed on drop.
pub struct Dns {
    ip: Ipv4Addr,
    port: u16,
    process: Managed,
}

impl Dns {
    pub fn start(scenario: &Scenario, records: &DnsRecords) -> Dns {
        Dns::start_at(
            scenario,
            records,
            Ipv4Addr::LOCALHOST,
            free_port(),
            "dnsmasq",
        )
    }

    /// The same records on `ip:53`, for peers that resolve through the system resolver
    /// (Postfix's own mail): a `resolv.conf` can name an address but no port. Started
    /// under `name` (its files are `<name>.conf` and `<name>.log`).
    pub fn start_for_resolver(
        scenario: &Scenario,
        records: &DnsRecords,
        ip: Ipv4Addr,
        name: &str,
    ) -> Dns {
        Dns::start_at(scenario, records, ip, 53, name)
    }

    fn start_at(
        scenario: &Scenario,
        records: &DnsRecords,
        ip: Ipv4Addr,
        port: u16,
        name: &str,
    ) -> Dns {
        let conf_path = scenario.dir().join(format!("{name}.conf"));
        let mut conf = String::new();
        for line in [
            format!("port={port}"),
            format!("listen-address={ip}"),
            "bind-interfaces".into(),
            "no-resolv".into(),
            "no-hosts".into(),
            "no-poll".into(),
            "local=/test/".into(),
            "user=nobody".into(),
            "log-queries".into(),
            "log-facility=-".into(),
        ] {
            let _ = writeln!(conf, "{line}");
        }
        for line in &records.lines {
            let _ = writeln!(conf, "{line}");
        }
        std::fs::write(&conf_path, conf)
            .unwrap_or_else(|e| panic!("write {}: {e}", conf_path.display()));
        let args: Vec<OsString> = vec![
            format!("--conf-file={}", conf_path.display()).into(),
            "--keep-in-foreground".into(),
            // No pid file: nothing is written outside the scenario dir.
            "--pid-file".into(),
        ];
        let mut process = Managed::new(
            "dnsmasq",
            find_tool("dnsmasq", &[]),
            args,
            scenario.dir().join(format!("{name}.log")),
        );
        process.spawn();
        let addr = SocketAddr::from((ip, port));
        process.wait_ready(
            &format!("TCP {addr} accepting"),
            Duration::from_secs(10),
            || tcp_accepts(addr),
        );
        Dns { ip, port, process }
    }

    /// `127.0.0.1:PORT` (`IP:53` for [`Dns::start_for_resolver`]).
    pub fn addr(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// dnsmasq's log (every query is logged).
    pub fn log(&self) -> String {
        self.process.log()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_txt_is_split_into_255_byte_strings() {
        let value = "p=".to_string() + &"A".repeat(600);
        let records = DnsRecords::new().txt("s._domainkey.example.test", &value);
        let line = &records.lines[0];
        let parts: Vec<&str> = line
            .trim_start_matches("txt-record=s._domainkey.example.test,")
            .split(',')
            .collect();
        assert_eq!(parts.len(), 3);
        assert!(parts.iter().all(|p| p.len() <= 257));
        let joined: String = parts.iter().map(|p| p.trim_matches('"')).collect();
        assert_eq!(joined, value);
    }
}
