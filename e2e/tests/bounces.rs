//! Retries and bounces: a temporary failure comes back on schedule (a NATS message schedule,
//! not a redelivery loop) and is delivered once the MX accepts; a permanent failure gets
//! exactly one RFC 3464 bounce at the sender's mailbox and its address is suppressed.

use std::{thread, time::Duration};

use herald_e2e::{World, dkim_verify, header_values, require_netns, wait_until};

#[test]
fn hard_bounce_gets_one_dsn_and_the_address_is_suppressed() {
    require_netns();
    let world = World::start("bounce", &[]);
    let out = world
        .app()
        .from("sender@example.test")
        .to("reject@example.test")
        .header("Subject: bounce-original")
        .run();
    assert!(out.contains("250 2.0.0 Ok: queued as"), "{}", out.text());
    let dsn = |m: &Vec<u8>| {
        let t = String::from_utf8_lossy(m);
        t.contains("Undelivered Mail Returned to Sender") && t.contains("bounce-original")
    };
    let found = wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        world.mx.maildir_messages().into_iter().find(dsn)
    })
    .unwrap_or_else(|| panic!("no bounce arrived\n{}", world.logs()));
    let text = String::from_utf8_lossy(&found).to_string();
    // Addressed to the envelope sender, from the null sender, as RFC 3464 asks.
    assert!(text.contains("Return-Path: <>"), "{text}");
    let to = header_values(&found, "To");
    assert!(
        to.len() == 1 && to[0].contains("sender@example.test"),
        "{text}"
    );
    assert!(
        text.contains("multipart/report") && text.contains("report-type=\"delivery-status\"")
            || text.contains("report-type=delivery-status"),
        "{text}"
    );
    for needle in [
        "Content-Type: message/delivery-status",
        "Final-Recipient: rfc822; reject@example.test",
        "Action: failed",
        "Status: 5.1.1",
        "Diagnostic-Code: smtp; 550 5.1.1",
        "Content-Type: text/rfc822-headers",
    ] {
        assert!(text.contains(needle), "bounce lacks {needle:?}:\n{text}");
    }
    let (ok, report) = dkim_verify(&found, &world.dns);
    assert!(
        ok,
        "the bounce is DKIM-signed for the sender's domain:\n{report}"
    );
    // Exactly one bounce.
    thread::sleep(Duration::from_secs(3));
    let bounces = world.mx.maildir_messages().into_iter().filter(dsn).count();
    assert_eq!(bounces, 1, "{}", world.logs());
    // The address is now refused at RCPT.
    let again = world
        .app()
        .from("sender@example.test")
        .to("reject@example.test")
        .run();
    assert!(
        again.contains("550 5.1.1 Recipient <reject@example.test> is on the suppression list"),
        "{}",
        again.text()
    );
}

#[test]
fn temporary_failure_is_retried_on_schedule_and_delivered_once() {
    require_netns();
    let mut world = World::start("retry", &[]);
    world.mx.stop();
    world.submit("retry-marker");
    // Attempts fail while the MX is down (retry.initial is 2 s in the World).
    let deferred = wait_until(Duration::from_secs(20), Duration::from_millis(200), || {
        world.delivery.log().contains("\"deferred\"").then_some(())
    });
    assert!(deferred.is_some(), "no deferral\n{}", world.logs());
    world.mx.start_again();
    world.wait_arrival("retry-marker", Duration::from_secs(30));
    thread::sleep(Duration::from_secs(3));
    assert_eq!(world.arrived("retry-marker"), 1, "{}", world.logs());
}
