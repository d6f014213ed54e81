//! A fleet for delivery scenarios measured at the receiving end: nats-server, dnsmasq, one
//! recording MX per destination domain, a plaintext-AUTH `herald ingress` and several
//! `herald delivery` processes sharing one queue and one config file.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::{
    DeliveryConfig, DkimAlgorithm, DkimKey, Dns, DnsRecords, Herald, HeraldConfig, IngressConfig,
    Listener, Nats, RawSmtp, RecordingMx, Resources, Role, Scenario, TlsMode, unique_ip,
    wait_until,
};

pub const FLEET_ACCOUNT: &str = "app";
pub const FLEET_PASSWORD: &str = "s3cret";

/// How a [`Fleet`] is set up.
pub struct FleetOptions<'a> {
    /// Destination domains, each with its own recording MX.
    pub domains: &'a [&'a str],
    /// (alias, domain): the alias's MX is the same recording MX as the domain's (e.g. the
    /// sender's own domain, so that DSNs to the sender land there too).
    pub shared_mx: &'a [(&'a str, &'a str)],
    /// (domain, address): an MX the scenario runs itself (Postfix, smtp-sink), port 25.
    pub other_mx: &'a [(&'a str, Ipv4Addr)],
    /// Names of the delivery processes.
    pub deliveries: &'a [&'a str],
    /// YAML mapping merged into the `delivery:` section.
    pub delivery_yaml: &'a str,
    pub ack_wait: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
}

impl Default for FleetOptions<'_> {
    fn default() -> Self {
        FleetOptions {
            domains: &["dest.test"],
            shared_mx: &[],
            other_mx: &[],
            deliveries: &["delivery-a", "delivery-b", "delivery-c"],
            delivery_yaml: "{}",
            ack_wait: Duration::from_secs(10),
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(2),
        }
    }
}

/// Field order is drop order: Herald first, the peers next, the scenario dir last.
pub struct Fleet {
    pub deliveries: Vec<Herald>,
    pub ingress: Herald,
    /// (domain, its MX's address, its MX), in the order of [`FleetOptions::domains`].
    pub mxs: Vec<(String, Ipv4Addr, RecordingMx)>,
    pub dns: Dns,
    pub nats: Nats,
    /// The plaintext submission listener (AUTH allowed in clear).
    pub submission: SocketAddr,
    pub scenario: Scenario,
}

impl Fleet {
    /// `example.test` signs (DKIM) and sends; every destination domain's MX is a recording
    /// MX on its own loopback address, port 25.
    pub fn start(name: &str, opts: FleetOptions<'_>) -> Fleet {
        Fleet::start_in(Scenario::new(name), opts)
    }

    /// Like [`Fleet::start`], in a scenario where the test already started peers of its own
    /// (named in [`FleetOptions::other_mx`]).
    pub fn start_in(scenario: Scenario, opts: FleetOptions<'_>) -> Fleet {
        let nats = Nats::start(&scenario);
        let key = DkimKey::rsa(2048);
        let mut records = DnsRecords::new().txt("herald._domainkey.example.test", &key.dns_txt);
        let mut mxs = Vec::new();
        for domain in opts.domains {
            let ip = unique_ip();
            let host = format!("mx.{domain}");
            records = records.mx(domain, &host, 10).a(&host, ip);
            let label = domain.split('.').next().unwrap_or(domain);
            let mx = RecordingMx::start(&scenario, label, &[SocketAddr::from((ip, 25))]);
            mxs.push((domain.to_string(), ip, mx));
        }
        for (alias, domain) in opts.shared_mx {
            records = records.mx(alias, &format!("mx.{domain}"), 10);
        }
        for (domain, ip) in opts.other_mx {
            let host = format!("mx.{domain}");
            records = records.mx(domain, &host, 10).a(&host, *ip);
        }
        let dns = Dns::start(&scenario, &records);
        let resources = scenario.subdir("resources");
        Resources::new()
            .signing_domain(
                "example-test",
                "example.test",
                "herald",
                DkimAlgorithm::RsaSha256,
                Some(&key),
                None,
            )
            .account_with_password(FLEET_ACCOUNT, FLEET_PASSWORD, &["example-test"])
            .write(&resources);
        let submission = SocketAddr::from((scenario.ip(), scenario.port()));
        let mut config = HeraldConfig::new(&nats.url(), &resources);
        config.ingress = Some(IngressConfig {
            hostname: "ingress.herald.test".into(),
            tls: None,
            listeners: vec![Listener {
                name: "plain".into(),
                addr: submission,
                tls: TlsMode::None,
                allow_plaintext_auth: true,
            }],
        });
        config.delivery = Some(DeliveryConfig {
            hostname: "mta.herald.test".into(),
            nameservers: vec![dns.addr()],
            smtp_port: 25,
            retry_initial: opts.retry_initial,
            retry_max: opts.retry_max,
            ack_wait: opts.ack_wait,
            extra: Some(serde_yaml::from_str(opts.delivery_yaml).expect("delivery YAML mapping")),
        });
        let config = config.write(&scenario.dir().join("herald.yaml"));
        let ingress = Herald::start(
            &scenario,
            "ingress",
            Role::Ingress,
            &config,
            Some(submission),
        );
        let deliveries =
            Herald::start_several(&scenario, opts.deliveries, Role::Delivery, &config, &[]);
        Fleet {
            deliveries,
            ingress,
            mxs,
            dns,
            nats,
            submission,
            scenario,
        }
    }

    /// The recording MX of `domain`.
    pub fn mx(&self, domain: &str) -> &RecordingMx {
        &self.mx_entry(domain).2
    }

    /// The address of the recording MX of `domain`.
    pub fn mx_ip(&self, domain: &str) -> Ipv4Addr {
        self.mx_entry(domain).1
    }

    fn mx_entry(&self, domain: &str) -> &(String, Ipv4Addr, RecordingMx) {
        self.mxs
            .iter()
            .find(|(d, _, _)| d == domain)
            .unwrap_or_else(|| panic!("no MX for {domain} in this fleet"))
    }

    pub fn logs(&self) -> String {
        let mut out = format!("--- ingress:\n{}", self.ingress.log_tail());
        for d in &self.deliveries {
            out += &format!("\n--- {}:\n{}", d.name(), d.log_tail());
        }
        for (domain, _, mx) in &self.mxs {
            out += &format!("\n--- MX of {domain}:\n{}", mx.log_tail());
        }
        out + &format!("\n--- scenario {}", self.scenario.dir().display())
    }

    /// See [`submit`].
    pub fn submit(&self, rcpt: &str, ids: &[String]) -> Vec<Result<f64, String>> {
        submit(self.submission, rcpt, ids)
    }

    /// One transaction: `mail_from` is the whole MAIL command (parameters included),
    /// `data` the DATA content, dot-stuffed and ending in CRLF.CRLF. Every step must
    /// succeed; returns the queue id.
    pub fn submit_one(&self, mail_from: &str, rcpts: &[&str], data: &[u8]) -> String {
        let (mut c, greeting) = RawSmtp::connect(self.submission);
        assert!(greeting.starts_with("220"), "greeting: {greeting}");
        let auth = c.login(FLEET_ACCOUNT, FLEET_PASSWORD);
        assert!(auth.starts_with("235"), "AUTH: {auth}");
        let commands = std::iter::once((mail_from.to_string(), "250"))
            .chain(rcpts.iter().map(|r| (format!("RCPT TO:<{r}>"), "250")))
            .chain(std::iter::once(("DATA".to_string(), "354")));
        for (cmd, want) in commands {
            let reply = c.cmd(&cmd);
            assert!(reply.starts_with(want), "{cmd}: {reply}\n{}", self.logs());
        }
        c.send(data);
        let end = c.reply();
        c.cmd("QUIT");
        end.split("queued as ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_string)
            .unwrap_or_else(|| panic!("not queued: {end}\n{}", self.logs()))
    }

    /// Like [`Fleet::submit`], but every message must be queued.
    pub fn submit_all(&self, rcpt: &str, ids: &[String]) -> Vec<f64> {
        self.submit(rcpt, ids)
            .into_iter()
            .map(|r| r.unwrap_or_else(|e| panic!("not queued: {e}\n{}", self.logs())))
            .collect()
    }

    /// Waits until the MX of `domain` accepted every id at least once.
    pub fn wait_all(&self, domain: &str, ids: &[String], timeout: Duration) {
        let mx = self.mx(domain);
        let all = wait_until(timeout, Duration::from_millis(200), || {
            let counts = mx.message_id_counts();
            ids.iter().all(|id| counts.contains_key(id)).then_some(())
        });
        if all.is_none() {
            let counts = mx.message_id_counts();
            let missing: Vec<&String> = ids.iter().filter(|id| !counts.contains_key(*id)).collect();
            panic!(
                "{} of {} messages to {domain} missing after {timeout:?} (first: {:?})\n{}",
                missing.len(),
                ids.len(),
                missing.first(),
                self.logs()
            );
        }
    }
}

/// Submits one message per Message-ID to `rcpt` at the fleet's `submission` address over
/// one connection (MAIL, RCPT and DATA pipelined). Returns, per id, when it was queued
/// (Unix seconds) or the reply that refused it.
pub fn submit(submission: SocketAddr, rcpt: &str, ids: &[String]) -> Vec<Result<f64, String>> {
    let (mut c, greeting) = RawSmtp::connect(submission);
    assert!(greeting.starts_with("220"), "greeting: {greeting}");
    let auth = c.login(FLEET_ACCOUNT, FLEET_PASSWORD);
    assert!(auth.starts_with("235"), "AUTH: {auth}");
    let mut out = Vec::with_capacity(ids.len());
    for (i, id) in ids.iter().enumerate() {
        c.send(
            format!("MAIL FROM:<sender@example.test>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n").as_bytes(),
        );
        let replies = [c.reply(), c.reply(), c.reply()];
        if !replies[2].starts_with("354") {
            out.push(Err(format!("{id}: {replies:?}")));
            continue;
        }
        c.send(
            format!(
                "From: sender@example.test\r\nTo: {rcpt}\r\nSubject: message {i}\r\n\
                 Message-ID: {id}\r\n\r\nbody of message {i}\r\n.\r\n"
            )
            .as_bytes(),
        );
        let end = c.reply();
        out.push(if end.contains("queued as") {
            Ok(unix_now())
        } else {
            Err(format!("{id}: {end}"))
        });
    }
    c.cmd("QUIT");
    out
}

/// Unique Message-IDs for a scenario.
pub fn message_ids(tag: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("<{tag}-{i}-{}@example.test>", std::process::id()))
        .collect()
}

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
