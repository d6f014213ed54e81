//! Ingress policy scenarios: what a client sees when it breaks the rules, and that nothing
//! it was refused for is ever queued. Clients are swaks and a raw SMTP client for the probes
//! swaks cannot send (bare line endings, SIZE parameters).

use std::{net::SocketAddr, thread, time::Duration};

use herald_e2e::{RawSmtp, WORLD_ACCOUNT, WORLD_PASSWORD, World, require_netns};

/// How long a message that should not exist is given to show up anyway.
const GRACE: Duration = Duration::from_secs(4);

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A world whose ingress listens in plaintext (AUTH allowed without TLS) for raw probes.
fn plain_world(name: &str, extra: &[(&str, &str)]) -> (World, SocketAddr) {
    require_netns();
    let world = World::start_plaintext(name, &env(extra));
    let addr = world.submission;
    (world, addr)
}

fn logged_in(addr: SocketAddr) -> RawSmtp {
    let (mut c, greeting) = RawSmtp::connect(addr);
    assert!(greeting.starts_with("220"), "greeting: {greeting}");
    let auth = c.login(WORLD_ACCOUNT, WORLD_PASSWORD);
    assert!(auth.starts_with("235"), "AUTH: {auth}");
    c
}

#[test]
fn header_from_outside_the_account_domains_is_refused_550() {
    require_netns();
    let world = World::start("header-from", &[]);
    let out = world
        .app()
        .from("billing@example.test")
        .to("user@example.test")
        .header("From: Spoofer <ceo@bank.test>")
        .header("Subject: header-from-spoof")
        .run();
    assert!(
        out.contains("550 5.7.1 From header domain bank.test is not allowed"),
        "expected the header From refusal:\n{}",
        out.text()
    );
    // Any local part under the verified domain is fine, in envelope and header alike.
    let ok = world
        .app()
        .from("nfe@example.test")
        .to("user@example.test")
        .header("From: Invoices <nfe@example.test>")
        .header("Subject: header-from-ok")
        .run();
    assert!(ok.contains("250 2.0.0 Ok: queued as"), "{}", ok.text());
    world.wait_arrival("header-from-ok", Duration::from_secs(30));
    thread::sleep(GRACE);
    assert_eq!(
        world.arrived("header-from-spoof"),
        0,
        "a refused message was delivered"
    );
}

/// Each probe hides a second transaction behind a line ending that is not CRLF. None may
/// yield a second message; with bare line endings refused, none yields any.
#[test]
fn smtp_smuggling_probes_never_yield_a_second_message() {
    let (world, addr) = plain_world("smuggling", &[]);
    let probes: &[(&str, &[u8])] = &[
        ("LF.LF", b"\n.\n"),
        ("LF.CRLF", b"\n.\r\n"),
        ("CR.CR", b"\r.\r"),
        ("CRLF.LF", b"\r\n.\n"),
        ("CRLF.CR", b"\r\n.\r"),
        ("CR.CRLF", b"\r.\r\n"),
        ("LF.CR", b"\n.\r"),
        ("CR.LF", b"\r.\n"),
    ];
    let mut queued = 0;
    for (name, ending) in probes {
        let mut c = logged_in(addr);
        assert!(c.cmd("MAIL FROM:<sender@example.test>").starts_with("250"));
        assert!(c.cmd("RCPT TO:<user@example.test>").starts_with("250"));
        assert!(c.cmd("DATA").starts_with("354"));
        let mut payload =
            format!("From: sender@example.test\r\nSubject: smuggle-outer-{name}\r\n\r\nouter")
                .into_bytes();
        payload.extend_from_slice(ending);
        payload.extend_from_slice(
            format!(
                "MAIL FROM:<sender@example.test>\r\nRCPT TO:<user@example.test>\r\nDATA\r\n\
                 From: sender@example.test\r\nSubject: smuggle-inner-{name}\r\n\r\ninner\r\n.\r\n"
            )
            .as_bytes(),
        );
        c.send(&payload);
        // Every reply the server gives to what followed, until it goes quiet.
        let mut replies = Vec::new();
        c.send(b"QUIT\r\n");
        loop {
            let r = c.reply();
            if r.is_empty() {
                break;
            }
            let done = r.starts_with("221");
            replies.push(r);
            if done {
                break;
            }
        }
        let ok = replies.iter().filter(|r| r.contains("queued as")).count();
        queued += ok;
        assert!(ok <= 1, "probe {name} queued {ok} messages: {replies:?}");
        assert!(
            replies.iter().any(|r| r.starts_with("550 5.5.2")),
            "probe {name}: expected 550 5.5.2 for the bare line ending, got {replies:?}"
        );
    }
    println!("smuggling probes: {} sent, {queued} queued", probes.len());
    thread::sleep(GRACE);
    let delivered = world.arrived("smuggle-");
    println!("smuggling probes: {delivered} delivered");
    assert_eq!(queued, 0);
    assert_eq!(delivered, 0, "{}", world.logs());
}

#[test]
fn protocol_limits_get_their_documented_codes_and_queue_nothing() {
    let (world, addr) = plain_world(
        "limits",
        &[
            ("HERALD_INGRESS__MAX_MESSAGE_SIZE", "20000"),
            ("HERALD_INGRESS__MAX_RECIPIENTS", "2"),
        ],
    );
    let mut c = logged_in(addr);
    // SIZE declared above the limit: refused at MAIL.
    let r = c.cmd("MAIL FROM:<sender@example.test> SIZE=50000");
    assert!(r.starts_with("552 5.3.4"), "{r}");
    // Too many recipients: the third is refused, the first two kept.
    assert!(c.cmd("MAIL FROM:<sender@example.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<a@example.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<b@example.test>").starts_with("250"));
    let r = c.cmd("RCPT TO:<c@example.test>");
    assert!(r.starts_with("452 4.5.3"), "{r}");
    // Oversized by data, not by declaration.
    assert!(c.cmd("DATA").starts_with("354"));
    let mut big = b"From: sender@example.test\r\nSubject: limits-big\r\n\r\n".to_vec();
    for _ in 0..400 {
        big.extend_from_slice(&[b'x'; 98]);
        big.extend_from_slice(b"\r\n");
    }
    big.extend_from_slice(b".\r\n");
    c.send(&big);
    let r = c.reply();
    assert!(r.starts_with("552 5.3.4"), "{r}");
    // A 5,000-octet line.
    assert!(c.cmd("MAIL FROM:<sender@example.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<a@example.test>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    let mut long = b"From: sender@example.test\r\nSubject: limits-long\r\n\r\n".to_vec();
    long.extend_from_slice(&[b'y'; 5000]);
    long.extend_from_slice(b"\r\n.\r\n");
    c.send(&long);
    let r = c.reply();
    assert!(r.starts_with("550 5.5.2"), "{r}");
    // A bare LF.
    assert!(c.cmd("MAIL FROM:<sender@example.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<a@example.test>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(b"From: sender@example.test\r\nSubject: limits-bare\r\n\r\none\ntwo\r\n.\r\n");
    let r = c.reply();
    assert!(r.starts_with("550 5.5.2"), "{r}");
    // A command line beyond what SMTP allows.
    let r = c.cmd(&format!("NOOP {}", "z".repeat(5000)));
    assert!(r.starts_with("500 5.5.2"), "{r}");
    // The session still works after all that.
    assert!(c.cmd("NOOP").starts_with("250"));
    thread::sleep(GRACE);
    assert_eq!(world.arrived("limits-"), 0, "{}", world.logs());
}

#[test]
fn eleventh_connection_from_one_ip_gets_421() {
    let (_world, addr) = plain_world("conn-limit", &[]);
    let mut open = Vec::new();
    for i in 0..10 {
        let (c, greeting) = RawSmtp::connect(addr);
        assert!(greeting.starts_with("220"), "connection {i}: {greeting}");
        open.push(c);
    }
    let (_c, refused) = RawSmtp::connect(addr);
    assert!(
        refused.starts_with("421 4.7.0 Too many connections from 127."),
        "{refused}"
    );
    // A slot frees as soon as a connection closes.
    let mut first = open.remove(0);
    assert!(first.cmd("QUIT").starts_with("221"));
    drop(first);
    let admitted =
        herald_e2e::wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
            let (c, g) = RawSmtp::connect(addr);
            g.starts_with("220").then_some(c)
        });
    assert!(admitted.is_some(), "no slot after a close");
}

#[test]
fn failed_auth_blocks_the_ip_on_every_pod() {
    let (world, addr) = plain_world("auth-block", &[("HERALD_INGRESS__MAX_AUTH_FAILURES", "3")]);
    for i in 1..=3 {
        let (mut c, _) = RawSmtp::connect(addr);
        let r = c.login(WORLD_ACCOUNT, "wrong");
        assert!(r.starts_with("535 5.7.8"), "attempt {i}: {r}");
        if i == 3 {
            let next = c.reply();
            assert!(
                next.starts_with("421 4.7.0 Too many failed authentications"),
                "{next}"
            );
        }
    }
    // Another pod knows: even the right password is not tried.
    let (_pod_b, addr_b) = world.another_ingress(
        "ingress-b",
        &[(
            "HERALD_INGRESS__MAX_AUTH_FAILURES".to_string(),
            "3".to_string(),
        )],
    );
    let (mut c, _) = RawSmtp::connect(addr_b);
    let r = c.login(WORLD_ACCOUNT, WORLD_PASSWORD);
    assert!(
        r.starts_with("421 4.7.0 Too many failed authentications"),
        "{r}"
    );
}

#[test]
fn sigterm_during_data_lets_the_open_transaction_finish_and_accepts_no_one_new() {
    let (world, addr) = plain_world("drain", &[]);
    let mut c = logged_in(addr);
    assert!(c.cmd("MAIL FROM:<sender@example.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<user@example.test>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(b"From: sender@example.test\r\nSubject: drain-marker\r\n\r\nfirst half\r\n");
    let pid = world.ingress.pid().expect("ingress runs");
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    // Draining: no new connection is taken.
    let refused = herald_e2e::wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
            .is_err()
            .then_some(())
    });
    assert!(
        refused.is_some(),
        "ingress still accepts connections after SIGTERM"
    );
    // The open transaction completes: its 250 means it is queued and will be delivered.
    c.send(b"second half\r\n.\r\n");
    let r = c.reply();
    assert!(
        r.starts_with("250 2.0.0 Ok: queued as"),
        "{r}\n{}",
        world.logs()
    );
    // After its transaction the session is told to go.
    let bye = c.cmd("NOOP");
    assert!(bye.starts_with("421 4.3.2") || bye.is_empty(), "{bye}");
    world.wait_arrival("drain-marker", Duration::from_secs(30));
}
