//! Return paths (VERP) and inbound bounces, against a real Postfix that bounces on its own.
//!
//! `example.test` sends with `returnPath: bounces.example.test`, whose MX (dnsmasq) is
//! Herald ingress's inbound listener on its own address, port 25. `dest.test`'s MX is a
//! Postfix that accepts `ghost@dest.test` at RCPT and bounces it afterwards, sending its
//! DSN by DNS MX to the envelope sender it saw: the VERP address. Herald must turn that
//! DSN into a `bounced` event for the original message and suppress the address; and its
//! inbound listener must refuse everything but its own return-path addresses.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use herald_e2e::{
    DeliveryConfig, DkimAlgorithm, DkimKey, Dns, DnsRecords, Event, EventKind, Herald,
    HeraldConfig, IngressConfig, Listener, Nats, Postfix, RawSmtp, Resources, Role, Scenario,
    Swaks, TlsMode, dkim_verify, events, header_values, self_signed_cert, wait_until,
};

const ACCOUNT: &str = "app";
const PASSWORD: &str = "s3cret";
const SECRET: &str = "e2e-return-path-secret-0123456789";
const RETURN_PATH_HOST: &str = "bounces.example.test";

/// Field order is drop order: Herald first, the peers next, the scenario dir last.
struct ReturnPathWorld {
    ingress: Herald,
    delivery: Herald,
    mx: Postfix,
    /// For Herald (127.0.0.1:PORT) and for Postfix's resolver (IP:53): the same records.
    dns: Dns,
    _resolver_dns: Dns,
    nats: Nats,
    submission: SocketAddr,
    inbound: SocketAddr,
    scenario: Scenario,
}

impl ReturnPathWorld {
    fn start(name: &str) -> ReturnPathWorld {
        let scenario = Scenario::new(name);
        let nats = Nats::start(&scenario);
        let key = DkimKey::rsa(2048);
        let submission = SocketAddr::from((scenario.ip(), 587));
        let inbound = SocketAddr::from((scenario.ip(), 25));
        // Postfix's resolver address is fixed before Postfix starts; its records, which
        // need Postfix's address, are served from before its first bounce.
        let resolver_ip = scenario.ip();
        let mx = Postfix::start_domain(
            &scenario,
            "dest",
            "dest.test",
            &["ghost@dest.test"],
            resolver_ip,
        );
        let records = DnsRecords::new()
            .txt("herald._domainkey.example.test", &key.dns_txt)
            .mx("dest.test", "mx.dest.test", 10)
            .a("mx.dest.test", mx.ip())
            .mx(RETURN_PATH_HOST, "mx.bounces.example.test", 10)
            .a("mx.bounces.example.test", ip_of(inbound));
        let dns = Dns::start(&scenario, &records);
        let resolver_dns = Dns::start_for_resolver(&scenario, &records, resolver_ip, "resolver");

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
            .domain_spec(
                "example-test",
                &format!("{{returnPath: {RETURN_PATH_HOST}}}"),
            )
            .account_with_password(ACCOUNT, PASSWORD, &["example-test"])
            .write(&resources);
        let (cert, keyfile) = self_signed_cert(&scenario.subdir("tls"));
        let mut config = HeraldConfig::new(&nats.url(), &resources);
        config.ingress = Some(IngressConfig {
            hostname: "ingress.herald.test".into(),
            tls: Some((cert, keyfile)),
            listeners: vec![Listener {
                name: "submission".into(),
                addr: submission,
                tls: TlsMode::Starttls,
                allow_plaintext_auth: false,
            }],
        });
        config.delivery = Some(DeliveryConfig {
            hostname: "mta.herald.test".into(),
            nameservers: vec![dns.addr()],
            smtp_port: 25,
            retry_initial: Duration::from_secs(2),
            retry_max: Duration::from_secs(4),
            ack_wait: Duration::from_secs(5),
            extra: None,
        });
        let config = config.write(&scenario.dir().join("herald.yaml"));
        // The listeners and the secret as an operator would set them: by environment.
        let secret = ("HERALD_BOUNCES__SECRET".to_string(), SECRET.to_string());
        let listeners = (
            "HERALD_INGRESS__LISTENERS".to_string(),
            format!(
                "[{{name: submission, addr: \"{submission}\", tls: starttls}}, \
                 {{name: mx, addr: \"{inbound}\", tls: none, inbound: true}}]"
            ),
        );
        let ingress = Herald::start_with_env(
            &scenario,
            "ingress",
            Role::Ingress,
            &config,
            Some(submission),
            &[secret.clone(), listeners],
        );
        let delivery = Herald::start_with_env(
            &scenario,
            "delivery",
            Role::Delivery,
            &config,
            None,
            &[secret],
        );
        ReturnPathWorld {
            ingress,
            delivery,
            mx,
            dns,
            _resolver_dns: resolver_dns,
            nats,
            submission,
            inbound,
            scenario,
        }
    }

    fn app(&self) -> Swaks {
        Swaks::new(self.submission.ip(), self.submission.port())
            .starttls()
            .auth_plain(ACCOUNT, PASSWORD)
    }

    /// Submits one message to `rcpt` and returns its queue id.
    fn submit(&self, rcpt: &str, marker: &str) -> String {
        let out = self
            .app()
            .from("app@example.test")
            .to(rcpt)
            .header(&format!("Subject: {marker}"))
            .run();
        let text = out.text();
        text.split("queued as ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_string)
            .unwrap_or_else(|| panic!("not queued:\n{text}\n{}", self.logs()))
    }

    /// The stored message whose text contains `marker`.
    fn wait_message(&self, marker: &str) -> Vec<u8> {
        wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
            self.mx
                .maildir_messages()
                .into_iter()
                .find(|m| String::from_utf8_lossy(m).contains(marker))
        })
        .unwrap_or_else(|| panic!("{marker} never arrived\n{}", self.logs()))
    }

    fn wait_event(&self, what: &str, probe: impl Fn(&Event) -> bool) -> Event {
        wait_until(Duration::from_secs(60), Duration::from_millis(250), || {
            events(&self.nats.url()).into_iter().find(|e| probe(e))
        })
        .unwrap_or_else(|| {
            panic!(
                "no {what} event; events:\n{:#?}\n{}",
                events(&self.nats.url()),
                self.logs()
            )
        })
    }

    fn logs(&self) -> String {
        format!(
            "--- ingress:\n{}\n--- delivery:\n{}\n--- postfix maillog:\n{}\n--- scenario {}",
            self.ingress.log_tail(),
            self.delivery.log_tail(),
            self.mx.log_tail(),
            self.scenario.dir().display()
        )
    }
}

fn ip_of(addr: SocketAddr) -> Ipv4Addr {
    match addr.ip() {
        std::net::IpAddr::V4(ip) => ip,
        std::net::IpAddr::V6(_) => panic!("scenario addresses are IPv4"),
    }
}

/// `b+<queue id>-<10 hex>@bounces.example.test` for `queue_id`.
fn is_verp_for(address: &str, queue_id: &str) -> bool {
    let Some((local, host)) = address.rsplit_once('@') else {
        return false;
    };
    let Some((id, tag)) = local
        .strip_prefix("b+")
        .and_then(|rest| rest.split_once('-'))
    else {
        return false;
    };
    host == RETURN_PATH_HOST
        && id == queue_id
        && tag.len() == 10
        && tag.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The address inside `Return-Path: <...>`.
fn return_path(message: &[u8]) -> String {
    header_values(message, "Return-Path")
        .first()
        .map(|v| {
            v.trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_string()
        })
        .unwrap_or_default()
}

#[test]
fn asynchronous_bounce_comes_back_by_verp_and_suppresses_the_address() {
    let world = ReturnPathWorld::start("return-path");

    // A good recipient: the MX saw the VERP address as MAIL FROM, and DKIM still passes.
    let good_id = world.submit("user@dest.test", "verp-good");
    let good = world.wait_message("verp-good");
    let seen = return_path(&good);
    println!("queue id {good_id}: the MX saw MAIL FROM:<{seen}>");
    assert!(
        is_verp_for(&seen, &good_id),
        "Return-Path {seen:?} is not the VERP address of {good_id}\n{}",
        String::from_utf8_lossy(&good)
    );
    let (ok, report) = dkim_verify(&good, &world.dns);
    assert!(ok, "DKIM fails at the MX:\n{report}");

    // ghost@dest.test is accepted at RCPT (a `delivered` event) and bounced later by the
    // MX, whose DSN comes back to the inbound listener through DNS.
    let ghost_id = world.submit("ghost@dest.test", "verp-ghost");
    let bounced = world.wait_event("bounced", |e| {
        e.kind == EventKind::Bounced && e.queue_id == ghost_id
    });
    println!("bounced event: {bounced:#?}");
    assert_eq!(bounced.recipients, vec!["ghost@dest.test".to_string()]);
    assert_eq!(bounced.enhanced_code, "5.1.1");
    assert_eq!(bounced.bounce_class, "hard");
    assert_eq!(bounced.account, "default/app");
    assert_eq!(
        bounced.sender, "app@example.test",
        "the app's sender, not the VERP"
    );
    assert!(bounced.subject.ends_with(".bounced"), "{}", bounced.subject);
    assert!(
        events(&world.nats.url())
            .iter()
            .any(|e| e.kind == EventKind::Delivered && e.queue_id == ghost_id),
        "the MX accepted ghost@ at RCPT first"
    );
    let log = world.mx.log();
    assert!(
        log.lines().any(|l| l.contains("status=sent")
            && l.contains("@bounces.example.test")
            && l.contains(&format!(
                "relay=mx.bounces.example.test[{}]:25",
                world.inbound.ip()
            ))),
        "Postfix did not deliver its DSN to the inbound listener:\n{log}"
    );
    assert!(
        world.ingress.log().contains("bounce report"),
        "{}",
        world.logs()
    );

    // The address is suppressed: the next submission to it is refused at RCPT.
    let again = world
        .app()
        .from("app@example.test")
        .to("ghost@dest.test")
        .run();
    assert!(
        again.contains("550 5.1.1 Recipient <ghost@dest.test> is on the suppression list"),
        "{}\n{}",
        again.text(),
        world.logs()
    );
    // No bounce of the bounce: nothing went back to the app or anywhere else.
    std::thread::sleep(Duration::from_secs(2));
    let dsns = world
        .mx
        .maildir_messages()
        .iter()
        .filter(|m| String::from_utf8_lossy(m).contains("Undelivered Mail"))
        .count();
    assert_eq!(dsns, 0, "{}", world.logs());
}

#[test]
fn inbound_listener_takes_only_its_own_return_paths() {
    let world = ReturnPathWorld::start("inbound-refusals");
    let id = world.submit("user@dest.test", "verp-probe");
    let verp = return_path(&world.wait_message("verp-probe"));
    assert!(is_verp_for(&verp, &id), "{verp}");
    let (local, _) = verp.rsplit_once('@').expect("an address");
    let (prefix, tag) = local.rsplit_once('-').expect("a tag");
    let forged_tag = format!(
        "{prefix}-{}",
        if tag.starts_with('0') { "1" } else { "0" }.repeat(10)
    );

    let (mut c, greeting) = RawSmtp::connect(world.inbound);
    assert!(greeting.starts_with("220"), "{greeting}");
    let ehlo = c.cmd("EHLO mx.dest.test");
    println!("EHLO: {ehlo}");
    assert!(ehlo.starts_with("250") && !ehlo.contains("AUTH"), "{ehlo}");
    assert!(
        c.cmd("AUTH PLAIN AGFwcABzM2NyZXQ=")
            .starts_with("503 5.5.1")
    );
    assert!(c.cmd("MAIL FROM:<>").starts_with("250"));
    let probes = [
        ("someone@dest.test".to_string(), "554 5.7.1"),
        ("user@example.test".to_string(), "554 5.7.1"),
        (format!("{forged_tag}@{RETURN_PATH_HOST}"), "550 5.1.1"),
        (format!("{prefix}@{RETURN_PATH_HOST}"), "550 5.1.1"),
        (
            format!("b+01JD5Z8Q4R6N3V2W1X0Y9Z8A7B-0123456789@{RETURN_PATH_HOST}"),
            "550 5.1.1",
        ),
        (format!("postmaster@{RETURN_PATH_HOST}"), "550 5.1.1"),
    ];
    for (rcpt, want) in &probes {
        let reply = c.cmd(&format!("RCPT TO:<{rcpt}>"));
        println!("RCPT TO:<{rcpt}> -> {}", reply.trim());
        assert!(reply.starts_with(want), "RCPT {rcpt}: {reply}");
    }
    assert!(c.cmd("DATA").starts_with("503"), "no recipient, no DATA");

    // An auto-reply to a real return path: accepted, nothing recorded.
    assert!(c.cmd("RSET").starts_with("250"));
    assert!(c.cmd("MAIL FROM:<user@dest.test>").starts_with("250"));
    let rcpt = c.cmd(&format!("RCPT TO:<{verp}>"));
    assert!(rcpt.starts_with("250"), "{rcpt}");
    assert!(c.cmd("DATA").starts_with("354"));
    let end = c.cmd(
        "From: user@dest.test\r\nSubject: Out of office\r\nAuto-Submitted: auto-replied\r\n\r\n\
         Back on Monday.\r\n.",
    );
    println!("auto-reply -> {}", end.trim());
    assert!(end.starts_with("250 2.0.0"), "{end}");

    // A delivery report about an address the message was not sent to changes nothing.
    assert!(c.cmd("MAIL FROM:<>").starts_with("250"));
    assert!(c.cmd(&format!("RCPT TO:<{verp}>")).starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    let forged = c.cmd(
        "From: MAILER-DAEMON@mx.dest.test\r\n\
         Content-Type: multipart/report; report-type=delivery-status; boundary=b\r\n\r\n\
         --b\r\nContent-Type: text/plain\r\n\r\nfailed\r\n\
         --b\r\nContent-Type: message/delivery-status\r\n\r\n\
         Reporting-MTA: dns; mx.dest.test\r\n\r\n\
         Final-Recipient: rfc822; victim@dest.test\r\nAction: failed\r\nStatus: 5.1.1\r\n\
         \r\n--b--\r\n.",
    );
    println!("report about another address -> {}", forged.trim());
    assert!(forged.starts_with("250 2.0.0"), "{forged}");
    c.cmd("QUIT");

    std::thread::sleep(Duration::from_secs(1));
    let recorded: Vec<Event> = events(&world.nats.url())
        .into_iter()
        .filter(|e| matches!(e.kind, EventKind::Bounced | EventKind::Deferred))
        .collect();
    assert!(recorded.is_empty(), "{recorded:#?}");
    let victim = world
        .app()
        .from("app@example.test")
        .to("victim@dest.test")
        .header("Subject: verp-victim")
        .run();
    assert!(
        victim.contains("queued as"),
        "a forged report suppressed an address:\n{}",
        victim.text()
    );
}
