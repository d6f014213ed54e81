//! Acceptance scenarios: the `herald` binary between real peers.
//!
//! Each test builds its own world: nats-server (JetStream), dnsmasq (MX + DKIM TXT
//! records), two Postfix instances playing the MX hosts of `example.test` and `other.test`,
//! then `herald ingress` and `herald delivery` as separate processes. Apps submit with
//! swaks; assertions are on what the peers saw (Postfix's Maildir, swaks' transcript,
//! dkimpy's verdict), never on Herald internals.
//!
//! Run inside the private network namespace: `scripts/test.sh`, or
//! `scripts/netns.sh cargo test --ignore-rust-version -p herald-e2e --offline`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use herald_e2e::{
    DeliveryConfig, DkimAlgorithm, DkimKey, Dns, DnsRecords, Herald, HeraldConfig, IngressConfig,
    Listener, Nats, Postfix, Resources, Role, Scenario, Swaks, SwaksOutput, TlsMode,
    dkim_signatures, dkim_verify, herald_bin, require_netns, self_signed_cert, wait_until,
};

const PASSWORD: &str = "s3cret";
/// How long a submitted message may take to reach the MX.
const ARRIVAL: Duration = Duration::from_secs(30);
/// After a crash, JetStream redelivery of an unacknowledged message is part of the path.
const ARRIVAL_AFTER_CRASH: Duration = Duration::from_secs(60);
const QUEUED: &str = "250 2.0.0 Ok: queued as";

/// One relay world. Field order is drop order: Herald first, then the peers, the scenario
/// dir (kept on failure, with every log) last.
struct Relay {
    delivery: Option<Herald>,
    ingress: Herald,
    mx_example: Postfix,
    mx_other: Postfix,
    dns: Dns,
    nats: Nats,
    config: PathBuf,
    submission: SocketAddr,
    scenario: Scenario,
}

impl Relay {
    /// `example.test` (MailDomain `example-test`, DKIM selector `herald`, signing with
    /// `algorithm`) -> MX mx1.example.test -> Postfix A; `other.test` -> Postfix B (only a
    /// recipient domain); SmtpAccount `app` / `s3cret` allowed `example-test`.
    fn start(name: &str, algorithm: DkimAlgorithm, start_delivery: bool) -> Relay {
        Relay::start_with_env(name, algorithm, start_delivery, &[])
    }

    /// Like [`Relay::start`], with extra environment for both Herald processes.
    fn start_with_env(
        name: &str,
        algorithm: DkimAlgorithm,
        start_delivery: bool,
        env: &[(String, String)],
    ) -> Relay {
        require_netns();
        let bin = herald_bin();
        assert!(
            bin.is_file(),
            "herald binary {} missing: cargo build --ignore-rust-version -p herald (or set HERALD_BIN)",
            bin.display()
        );
        let scenario = Scenario::new(name);
        let nats = Nats::start(&scenario);
        let mx_example = Postfix::start(&scenario, "example");
        let mx_other = Postfix::start(&scenario, "other");

        let rsa = matches!(algorithm, DkimAlgorithm::RsaSha256 | DkimAlgorithm::Both)
            .then(|| DkimKey::rsa(2048));
        let ed25519 = matches!(
            algorithm,
            DkimAlgorithm::Ed25519Sha256 | DkimAlgorithm::Both
        )
        .then(DkimKey::ed25519);
        let mut records = DnsRecords::new()
            .mx("example.test", "mx1.example.test", 10)
            .a("mx1.example.test", mx_example.ip())
            .mx("other.test", "mx1.other.test", 10)
            .a("mx1.other.test", mx_other.ip());
        match (&rsa, &ed25519) {
            (Some(r), Some(e)) => {
                records = records
                    .txt("herald._domainkey.example.test", &r.dns_txt)
                    .txt("herald-ed25519._domainkey.example.test", &e.dns_txt);
            }
            (Some(k), None) | (None, Some(k)) => {
                records = records.txt("herald._domainkey.example.test", &k.dns_txt);
            }
            (None, None) => unreachable!("every algorithm has a key"),
        }
        let dns = Dns::start(&scenario, &records);

        let resources_dir = scenario.subdir("resources");
        Resources::new()
            .signing_domain(
                "example-test",
                "example.test",
                "herald",
                algorithm,
                rsa.as_ref(),
                ed25519.as_ref(),
            )
            .account_with_password("app", PASSWORD, &["example-test"])
            .write(&resources_dir);

        let (cert, key) = self_signed_cert(&scenario.subdir("ingress-tls"));
        let submission = SocketAddr::from((scenario.ip(), 587));
        let mut config = HeraldConfig::new(&nats.url(), &resources_dir);
        config.ingress = Some(IngressConfig {
            hostname: "ingress.herald.test".into(),
            tls: Some((cert, key)),
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
            retry_max: Duration::from_secs(10),
            ack_wait: Duration::from_secs(5),
            extra: None,
        });
        let config = config.write(&scenario.dir().join("herald.yaml"));

        let ingress = Herald::start_with_env(
            &scenario,
            "ingress",
            Role::Ingress,
            &config,
            Some(submission),
            env,
        );
        let delivery = start_delivery.then(|| {
            Herald::start_with_env(&scenario, "delivery", Role::Delivery, &config, None, env)
        });
        Relay {
            delivery,
            ingress,
            mx_example,
            mx_other,
            dns,
            nats,
            config,
            submission,
            scenario,
        }
    }

    /// swaks aimed at the submission listener, STARTTLS, no AUTH yet.
    fn client(&self) -> Swaks {
        Swaks::new(self.submission.ip(), self.submission.port()).starttls()
    }

    /// The app's usual submission: STARTTLS + AUTH PLAIN as `app`.
    fn app(&self) -> Swaks {
        self.client().auth_plain("app", PASSWORD)
    }

    fn spawn_delivery(&self) -> Herald {
        Herald::spawn(
            &self.scenario,
            "delivery",
            Role::Delivery,
            &self.config,
            None,
        )
    }

    /// Logs of the Herald processes, for failure messages.
    fn herald_logs(&self) -> String {
        let mut out = format!(
            "--- herald ingress log ({}):\n{}",
            self.ingress.log_path().display(),
            self.ingress.log_tail()
        );
        if let Some(d) = &self.delivery {
            out += &format!(
                "\n--- herald delivery log ({}):\n{}",
                d.log_path().display(),
                d.log_tail()
            );
        }
        out
    }

    /// Waits until `mx` holds at least `n` messages carrying `marker`; panics with every
    /// relevant log otherwise.
    fn wait_for(&self, mx: &Postfix, marker: &str, n: usize, timeout: Duration) -> Vec<Vec<u8>> {
        wait_until(timeout, Duration::from_millis(100), || {
            let found = with_marker(mx.maildir_messages(), marker);
            (found.len() >= n).then_some(found)
        })
        .unwrap_or_else(|| {
            panic!(
                "{n} message(s) marked {marker:?} did not reach {} within {timeout:?} ({} there)\n\
                 --- postfix maillog:\n{}\n{}",
                mx.ip(),
                with_marker(mx.maildir_messages(), marker).len(),
                mx.log_tail(),
                self.herald_logs()
            )
        })
    }

    /// Asserts a 250 "queued" for the whole transaction.
    fn assert_queued(&self, out: &SwaksOutput) {
        assert!(
            out.code == 0 && out.contains(QUEUED),
            "submission not accepted (swaks exit {}):\n{}\n{}",
            out.code,
            out.text(),
            self.herald_logs()
        );
    }

    /// dkimpy verifies every signature against the test DNS, and the signatures are exactly
    /// `expected` (selector, algorithm) for d=example.test, in any order.
    fn assert_signed(&self, message: &[u8], expected: &[(&str, &str)]) {
        let (ok, report) = dkim_verify(message, &self.dns);
        let text = String::from_utf8_lossy(message);
        assert!(
            ok,
            "DKIM verification failed:\n{report}\n--- message:\n{text}\n{}",
            self.herald_logs()
        );
        let mut got: Vec<(String, String, String)> = dkim_signatures(message)
            .into_iter()
            .map(|t| {
                let get = |k: &str| t.get(k).cloned().unwrap_or_default();
                (get("d"), get("s"), get("a"))
            })
            .collect();
        let mut want: Vec<(String, String, String)> = expected
            .iter()
            .map(|(s, a)| ("example.test".to_string(), s.to_string(), a.to_string()))
            .collect();
        got.sort();
        want.sort();
        assert_eq!(
            got, want,
            "DKIM-Signature headers (d, s, a)\n--- message:\n{text}"
        );
    }
}

/// A Subject unique to this submission, to find it in a Maildir.
fn marker(test: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!(
        "{test}-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn subject(marker: &str) -> String {
    format!("Subject: e2e {marker}")
}

fn with_marker(messages: Vec<Vec<u8>>, marker: &str) -> Vec<Vec<u8>> {
    messages
        .into_iter()
        .filter(|m| String::from_utf8_lossy(m).contains(marker))
        .collect()
}

/// True if a server reply (not the client's own lines) starts with `code` and contains
/// every one of `words`.
fn has_reply(out: &SwaksOutput, code: &str, words: &[&str]) -> bool {
    out.replies()
        .iter()
        .any(|r| r.starts_with(code) && words.iter().all(|w| r.contains(w)))
}

fn submit_and_expect_signed(name: &str, algorithm: DkimAlgorithm, expected: &[(&str, &str)]) {
    let relay = Relay::start(name, algorithm, true);
    let m = marker(name);
    let out = relay
        .app()
        .from("sender@example.test")
        .to("user@example.test")
        .header(&subject(&m))
        .run();
    relay.assert_queued(&out);
    let arrived = relay.wait_for(&relay.mx_example, &m, 1, ARRIVAL);
    relay.assert_signed(&arrived[0], expected);
}

#[test]
fn starttls_auth_plain_submission_arrives_dkim_signed_rsa() {
    require_netns();
    submit_and_expect_signed("rsa", DkimAlgorithm::RsaSha256, &[("herald", "rsa-sha256")]);
}

#[test]
fn starttls_auth_plain_submission_arrives_dkim_signed_ed25519() {
    require_netns();
    submit_and_expect_signed(
        "ed25519",
        DkimAlgorithm::Ed25519Sha256,
        &[("herald", "ed25519-sha256")],
    );
}

#[test]
fn both_algorithms_sign_with_rsa_and_ed25519_selectors() {
    require_netns();
    submit_and_expect_signed(
        "both",
        DkimAlgorithm::Both,
        &[
            ("herald", "rsa-sha256"),
            ("herald-ed25519", "ed25519-sha256"),
        ],
    );
}

#[test]
fn two_domains_reach_both_mx_hosts() {
    require_netns();
    let relay = Relay::start("two-domains", DkimAlgorithm::RsaSha256, true);
    let m = marker("two-domains");
    let out = relay
        .app()
        .from("sender@example.test")
        .to("user@example.test,user@other.test")
        .header(&subject(&m))
        .run();
    relay.assert_queued(&out);
    let at_example = relay.wait_for(&relay.mx_example, &m, 1, ARRIVAL);
    let at_other = relay.wait_for(&relay.mx_other, &m, 1, ARRIVAL);
    relay.assert_signed(&at_example[0], &[("herald", "rsa-sha256")]);
    relay.assert_signed(&at_other[0], &[("herald", "rsa-sha256")]);
}

#[test]
fn wrong_password_gets_535() {
    require_netns();
    let relay = Relay::start("wrong-password", DkimAlgorithm::RsaSha256, true);
    let out = relay
        .client()
        .auth_plain("app", "not-the-password")
        .from("sender@example.test")
        .to("user@example.test")
        .run();
    assert!(
        out.code == 28 && has_reply(&out, "535 5.7.8", &[]),
        "expected AUTH to fail with 535 5.7.8 (swaks exit 28), got exit {}:\n{}\n{}",
        out.code,
        out.text(),
        relay.herald_logs()
    );
}

#[test]
fn unauthenticated_relay_refused_at_rcpt() {
    require_netns();
    let relay = Relay::start("no-auth", DkimAlgorithm::RsaSha256, true);
    let out = relay
        .client()
        .from("sender@example.test")
        .to("user@example.test")
        .run();
    let refused = has_reply(&out, "530 5.7.", &[]) || has_reply(&out, "554 5.7.", &[]);
    assert!(
        out.code == 24 && refused,
        "expected RCPT refused with 530/554 5.7.x (swaks exit 24), got exit {}:\n{}\n{}",
        out.code,
        out.text(),
        relay.herald_logs()
    );
}

#[test]
fn unknown_sender_domain_refused_550() {
    require_netns();
    let relay = Relay::start("unknown-sender", DkimAlgorithm::RsaSha256, true);
    let out = relay
        .app()
        .from("x@unknown.test")
        .to("user@example.test")
        .run();
    assert!(
        out.code == 23 && has_reply(&out, "550 5.7.1", &["unknown.test"]),
        "expected MAIL FROM refused with a 550 5.7.1 naming unknown.test (swaks exit 23), \
         got exit {}:\n{}\n{}",
        out.code,
        out.text(),
        relay.herald_logs()
    );
}

/// Copies of `marker` at `mx` once it has arrived and a few seconds (longer than the retry
/// delay) have passed for any duplicate: must be 1 or 2, never 0.
fn arrived_once_or_twice(relay: &Relay, mx: &Postfix, marker: &str) {
    relay.wait_for(mx, marker, 1, ARRIVAL_AFTER_CRASH);
    std::thread::sleep(Duration::from_secs(5));
    let copies = with_marker(mx.maildir_messages(), marker).len();
    assert!(
        (1..=2).contains(&copies),
        "{copies} copies of the message arrived (at-least-once allows 1 or 2)\n{}",
        relay.herald_logs()
    );
    if copies == 2 {
        eprintln!("note: the message arrived twice (redelivered after the crash)");
    }
}

/// How many times dnsmasq has been asked for `example.test`'s MX so far.
fn mx_lookups(relay: &Relay) -> usize {
    relay.dns.log().matches("query[MX] example.test").count()
}

/// Waits until dnsmasq gets one more MX query for `example.test` than `before`: the
/// peer-visible sign that delivery has taken the message and is about to connect.
fn wait_for_mx_lookup(relay: &Relay, before: usize, timeout: Duration) {
    let seen = wait_until(timeout, Duration::from_millis(2), || {
        (mx_lookups(relay) > before).then_some(())
    });
    if seen.is_none() {
        panic!(
            "delivery never looked up the MX of example.test within {timeout:?}\n\
             --- dnsmasq log:\n{}\n{}",
            relay.dns.log(),
            relay.herald_logs()
        );
    }
}

#[test]
fn sigkill_delivery_after_queued_loses_nothing() {
    require_netns();
    // Ingress only: the message is queued (250) while no delivery process exists.
    let mut relay = Relay::start("sigkill-delivery", DkimAlgorithm::RsaSha256, false);
    let m = marker("sigkill-delivery");
    let out = relay
        .app()
        .from("sender@example.test")
        .to("user@example.test")
        .header(&subject(&m))
        .run();
    relay.assert_queued(&out);

    // Start delivery and SIGKILL it the moment it shows it has the message (its MX lookup),
    // i.e. in the middle of delivering: before, during or right after the SMTP transaction.
    let lookups = mx_lookups(&relay);
    let mut delivery = relay.spawn_delivery();
    let started = Instant::now();
    wait_for_mx_lookup(&relay, lookups, Duration::from_secs(30));
    delivery.kill_9();
    eprintln!(
        "delivery killed {:?} after start, right after its MX lookup",
        started.elapsed()
    );

    delivery.start_again();
    relay.delivery = Some(delivery);
    arrived_once_or_twice(&relay, &relay.mx_example, &m);
}

#[test]
fn sigkill_delivery_during_mx_outage_loses_nothing() {
    require_netns();
    let mut relay = Relay::start("sigkill-outage", DkimAlgorithm::RsaSha256, true);
    // The MX is down: delivery can only fail temporarily and must keep the message.
    relay.mx_example.stop();
    let m = marker("sigkill-outage");
    let lookups = mx_lookups(&relay);
    let out = relay
        .app()
        .from("sender@example.test")
        .to("user@example.test")
        .header(&subject(&m))
        .run();
    relay.assert_queued(&out);
    wait_for_mx_lookup(&relay, lookups, Duration::from_secs(30));
    // Let the connection attempt fail (refused at once: nothing listens there).
    std::thread::sleep(Duration::from_millis(500));

    let mut delivery = relay.delivery.take().expect("delivery was started");
    delivery.kill_9();
    relay.mx_example.start_again();
    delivery.start_again();
    relay.delivery = Some(delivery);
    arrived_once_or_twice(&relay, &relay.mx_example, &m);
}

#[test]
fn nats_down_gives_451_at_end_of_data() {
    require_netns();
    let mut relay = Relay::start("nats-down", DkimAlgorithm::RsaSha256, true);
    relay.nats.stop();
    let m = marker("nats-down");
    let out = relay
        .app()
        .from("sender@example.test")
        .to("user@example.test")
        .header(&subject(&m))
        .run();
    // swaks: 25 = error reply to the DATA command, 26 = error reply after the body (end of
    // data). Either way the message was not taken: a 451, and no 250 for it.
    assert!(
        (out.code == 25 || out.code == 26) && has_reply(&out, "451 4.3.0", &[]),
        "expected 451 4.3.0 at DATA / end of data (swaks exit 25 or 26) while NATS is down, \
         got exit {}:\n{}\n{}",
        out.code,
        out.text(),
        relay.herald_logs()
    );
    assert!(!out.contains("queued"), "a queued reply:\n{}", out.text());
    let after_354 = out
        .replies()
        .into_iter()
        .skip_while(|r| !r.starts_with("354"));
    let acks: Vec<String> = after_354.filter(|r| r.starts_with("250")).collect();
    assert!(
        acks.is_empty(),
        "250 after the body: {acks:?}\n{}",
        out.text()
    );
}

#[test]
fn nats_restart_then_submission_and_delivery_recover() {
    require_netns();
    let mut relay = Relay::start("nats-restart", DkimAlgorithm::RsaSha256, true);
    relay.nats.stop();
    std::thread::sleep(Duration::from_secs(1));
    relay.nats.start_again();

    // Clients retry temporary failures; so does this one until Herald has reconnected.
    let m = marker("nats-restart");
    let mut transcripts = Vec::new();
    let accepted = wait_until(Duration::from_secs(30), Duration::from_secs(1), || {
        let out = relay
            .app()
            .from("sender@example.test")
            .to("user@example.test")
            .header(&subject(&m))
            .run();
        let ok = out.code == 0 && out.contains(QUEUED);
        transcripts.push(out.text());
        ok.then_some(())
    });
    assert!(
        accepted.is_some(),
        "no submission accepted within 30 s of NATS coming back; last transcript:\n{}\n{}",
        transcripts.last().cloned().unwrap_or_default(),
        relay.herald_logs()
    );
    let arrived = relay.wait_for(&relay.mx_example, &m, 1, ARRIVAL);
    relay.assert_signed(&arrived[0], &[("herald", "rsa-sha256")]);
}

/// The harness alone, without Herald: dnsmasq answers, Postfix stores into its Maildir
/// (over STARTTLS), gives its scripted 4xx/5xx, stops and starts again, nats-server
/// restarts healthy, and dkimpy verifies signatures made with [`DkimKey`]s whose TXT
/// records dnsmasq serves (and rejects unsigned or tampered mail).
#[test]
fn postfix_and_dns_harness_work() {
    require_netns();
    let scenario = Scenario::new("harness");
    let rsa = DkimKey::rsa(2048);
    let ed = DkimKey::ed25519();
    let mut mx = Postfix::start(&scenario, "mx");
    let dns = Dns::start(
        &scenario,
        &DnsRecords::new()
            .mx("example.test", "mx1.example.test", 10)
            .a("mx1.example.test", mx.ip())
            .txt("rsa._domainkey.example.test", &rsa.dns_txt)
            .txt("ed._domainkey.example.test", &ed.dns_txt),
    );

    let m = marker("harness");
    let message = format!(
        "From: sender@example.test\r\nTo: user@example.test\r\n{}\r\n\
         Date: Thu, 01 Jan 2026 00:00:00 +0000\r\nMessage-ID: <{m}@example.test>\r\n\r\n\
         Hello from the harness.\r\n\r\n",
        subject(&m)
    );
    let signed = dkimpy_sign_twice(&scenario, message.as_bytes(), &rsa, &ed);
    let data = scenario.dir().join("signed.eml");
    std::fs::write(&data, &signed).expect("write the signed message");

    let out = Swaks::new(mx.ip(), 25)
        .starttls()
        .from("sender@example.test")
        .to("user@example.test")
        .data_file(&data)
        .run();
    assert!(
        out.code == 0 && out.contains("250 2.0.0 Ok: queued as"),
        "postfix did not take the message (exit {}):\n{}",
        out.code,
        out.text()
    );
    let stored = mx.wait_for_messages(1, Duration::from_secs(30));
    let stored = with_marker(stored, &m);
    assert_eq!(stored.len(), 1);
    let (ok, report) = dkim_verify(&stored[0], &dns);
    assert!(ok, "dkimpy rejected what dkimpy signed:\n{report}");
    assert!(
        report.contains("d=example.test s=rsa a=rsa-sha256 ok")
            && report.contains("d=example.test s=ed a=ed25519-sha256 ok"),
        "{report}"
    );

    // A tampered body fails both signatures; no signature at all fails too.
    let tampered = String::from_utf8_lossy(&stored[0]).replace("Hello", "Jello");
    let (ok, report) = dkim_verify(tampered.as_bytes(), &dns);
    assert!(!ok, "tampered message verified:\n{report}");
    assert_eq!(report.matches("body hash mismatch").count(), 2, "{report}");
    let (ok, report) = dkim_verify(message.as_bytes(), &dns);
    assert!(!ok && report.contains("no DKIM-Signature"), "{report}");

    // Scripted answers per recipient.
    let out = Swaks::new(mx.ip(), 25)
        .from("sender@example.test")
        .to("tempfail@example.test")
        .run();
    assert!(
        out.code == 24 && has_reply(&out, "450 4.2.0", &[]),
        "{}",
        out.text()
    );
    let out = Swaks::new(mx.ip(), 25)
        .from("sender@example.test")
        .to("reject@example.test")
        .run();
    assert!(
        out.code == 24 && has_reply(&out, "550 5.1.1", &[]),
        "{}",
        out.text()
    );

    // Stop: nothing listens; start again: same address, same Maildir.
    mx.stop();
    let out = Swaks::new(mx.ip(), 25)
        .from("sender@example.test")
        .to("user@example.test")
        .run();
    assert_eq!(
        out.code,
        2,
        "postfix still answers after stop:\n{}",
        out.text()
    );
    mx.start_again();
    let out = Swaks::new(mx.ip(), 25)
        .from("sender@example.test")
        .to("user@example.test")
        .header(&subject(&format!("{m}-again")))
        .run();
    assert_eq!(out.code, 0, "{}", out.text());
    assert_eq!(mx.wait_for_messages(2, Duration::from_secs(30)).len(), 2);

    // nats-server: healthy, down, healthy again on the same port and store.
    let mut nats = Nats::start(&scenario);
    assert!(nats.healthy());
    nats.stop();
    assert!(!nats.healthy());
    nats.start_again();
    assert!(nats.healthy(), "{}", nats.log());
    assert!(nats.url().starts_with("nats://127.0.0.1:"));
}

fn dkimpy_sign_twice(scenario: &Scenario, message: &[u8], rsa: &DkimKey, ed: &DkimKey) -> Vec<u8> {
    let once = herald_e2e::dkimpy_sign(scenario, message, "example.test", "rsa", rsa);
    herald_e2e::dkimpy_sign(scenario, &once, "example.test", "ed", ed)
}
