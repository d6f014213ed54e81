//! The recording MX itself (no Herald): what it logs and stores, and that control file
//! changes take effect at once, even several within one timestamp tick.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use herald_e2e::{RawSmtp, RecordingMx, Scenario, max_concurrent_connections};
use serde_json::json;

/// One transaction on an open session; returns the replies to RCPT (one per recipient)
/// and to the end of DATA (empty if no recipient was accepted).
fn send(c: &mut RawSmtp, rcpts: &[&str], message_id: &str) -> (Vec<String>, String) {
    assert!(c.cmd("MAIL FROM:<a@example.test>").starts_with("250"));
    let replies: Vec<String> = rcpts
        .iter()
        .map(|r| c.cmd(&format!("RCPT TO:<{r}>")))
        .collect();
    if !replies.iter().any(|r| r.starts_with("250")) {
        c.cmd("RSET");
        return (replies, String::new());
    }
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(format!("Message-ID: {message_id}\r\nSubject: t\r\n\r\nbody\r\n.\r\n").as_bytes());
    (replies, c.reply())
}

fn session(addr: SocketAddr) -> RawSmtp {
    let (mut c, greeting) = RawSmtp::connect(addr);
    assert!(greeting.starts_with("220"), "greeting: {greeting}");
    let ehlo = c.cmd("EHLO client.test");
    for ext in ["PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "SIZE"] {
        assert!(ehlo.contains(ext), "{ext} missing from {ehlo}");
    }
    c
}

#[test]
fn recording_mx_logs_stores_and_obeys_its_control_file() {
    let scenario = Scenario::new("recording-mx");
    let ip = scenario.ip();
    let listen = [
        SocketAddr::from((ip, scenario.port())),
        SocketAddr::from((ip, scenario.port())),
    ];
    let mx = RecordingMx::start(&scenario, "self", &listen);

    let mut a = session(listen[0]);
    let (_, end) = send(&mut a, &["u@dest.test"], "<one@x>");
    assert!(end.starts_with("250"), "{end}");

    // Two files of the same size written back to back (within one mtime tick, likely):
    // the MX, which has just read the first, must notice the second.
    mx.set_control(json!({"data_reply": "250 2.0.0 first"}));
    let (_, end) = send(&mut a, &["u@dest.test"], "<first@x>");
    assert!(end.starts_with("250 2.0.0 first"), "{end}");
    mx.set_control(json!({"data_reply": "250 2.0.0 again"}));
    let (_, end) = send(&mut a, &["u@dest.test"], "<again@x>");
    assert!(end.starts_with("250 2.0.0 again"), "{end}");

    mx.set_control(json!({
        "rcpt": {"busy@dest.test": "450 4.2.1 Mailbox busy", "@gone.test": "550 5.1.1 No such user"},
        "data_reply": "250 2.0.0 second",
    }));
    let (rcpt, end) = send(
        &mut a,
        &["busy@dest.test", "x@gone.test", "ok@dest.test"],
        "<two@x>",
    );
    assert!(rcpt[0].starts_with("450 4.2.1"), "{rcpt:?}");
    assert!(rcpt[1].starts_with("550 5.1.1"), "{rcpt:?}");
    assert!(rcpt[2].starts_with("250"), "{rcpt:?}");
    assert!(end.starts_with("250 2.0.0 second"), "{end}");

    // `a` is still open: one more connection is over the limit.
    mx.set_control(json!({"max_connections": 1}));
    let (_b, refused) = RawSmtp::connect(listen[1]);
    assert!(refused.starts_with("421 4.7.0"), "{refused}");
    mx.set_control(json!({"greeting": "421 4.7.0 Too many connections, slow down"}));
    let (_c, refused) = RawSmtp::connect(listen[1]);
    assert!(refused.contains("slow down"), "{refused}");
    mx.set_control(json!({}));
    a.cmd("QUIT");
    drop(a);

    let data = mx
        .wait_for_data(4, Duration::from_secs(5))
        .expect("four messages accepted");
    assert_eq!(data[3].rcpts, vec!["ok@dest.test".to_string()]);
    let events = herald_e2e::wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        let ev = mx.events();
        (ev.iter().filter(|e| e.ev == "close").count() == 3).then_some(ev)
    })
    .expect("three connections closed");
    let kinds = |k: &str| events.iter().filter(|e| e.ev == k).count();
    assert_eq!((kinds("connect"), kinds("refused")), (3, 2));
    assert_eq!(kinds("rcpt"), 6);
    assert!(
        events
            .iter()
            .all(|e| e.peer == IpAddr::from([127, 0, 0, 1]))
    );
    assert_eq!(
        events
            .iter()
            .find(|e| e.ev == "ehlo")
            .and_then(|e| e.name.clone()),
        Some("client.test".to_string())
    );
    // The refused connections were open next to `a` for a moment.
    assert_eq!(max_concurrent_connections(&events, None), 2);
    let counts = mx.message_id_counts();
    assert_eq!(counts.get("<one@x>"), Some(&1));
    assert_eq!(counts.get("<two@x>"), Some(&1));
    assert_eq!(mx.data_by_peer().values().sum::<usize>(), 4);
    let stored = mx.messages();
    assert_eq!(stored.len(), 4);
    let first = String::from_utf8_lossy(&stored[0]);
    assert!(
        first.starts_with("X-Recording-Peer: 127.0.0.1\r\nMessage-ID: <one@x>\r\n"),
        "{first}"
    );
}
