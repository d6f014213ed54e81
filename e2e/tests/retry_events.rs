//! A 450 retried on schedule, seen from the outside: the recording MX defers one recipient
//! until the sender has had its delay warning, then accepts. Herald's `HERALD_EVENTS` must
//! tell the same story as the MX's log — one `deferred` event per attempt, numbered 1, 2,
//! ... and spaced by the configured backoff, one `delayed` event with its DSN at the sender,
//! then one `delivered` event for the next attempt — and the message arrives once.

use std::thread;
use std::time::Duration;

use herald_e2e::{
    Event, EventKind, Fleet, FleetOptions, MxEvent, dkim_verify, events, header_values,
    require_netns, wait_until,
};
use serde_json::json;

const SENDER: &str = "sender@example.test";
const RCPT: &str = "slow@dest.test";
const BUSY: &str = "450 4.2.1 Mailbox busy, try later";
const RETRY_INITIAL: Duration = Duration::from_secs(2);
const RETRY_MAX: Duration = Duration::from_secs(4);
/// Above `RETRY_INITIAL`, so that the warning needs at least two deferrals.
const DELAY_WARNING: &str = "3s";
const DSN_SUBJECT: &str = "Delayed Mail (still being retried)";
/// The backoff's jitter is ±10 %.
const JITTER: f64 = 0.1;

struct Setup {
    fleet: Fleet,
}

impl Setup {
    /// `example.test` signs and sends; the recording MX is the MX of `dest.test` and of
    /// `example.test` (where the delay DSN to the sender goes).
    fn start(name: &str) -> Setup {
        let delivery_yaml = format!("{{delay_warning: {DELAY_WARNING}}}");
        let fleet = Fleet::start(
            name,
            FleetOptions {
                domains: &["dest.test"],
                shared_mx: &[("example.test", "dest.test")],
                deliveries: &["delivery"],
                delivery_yaml: &delivery_yaml,
                ack_wait: Duration::from_secs(5),
                retry_initial: RETRY_INITIAL,
                retry_max: RETRY_MAX,
                ..Default::default()
            },
        );
        fleet
            .mx("dest.test")
            .set_control(json!({"rcpt": {RCPT: BUSY}}));
        Setup { fleet }
    }

    /// Submits one message and returns its queue id.
    fn submit(&self, message_id: &str) -> String {
        let data = format!(
            "From: {SENDER}\r\nTo: {RCPT}\r\nSubject: retry-events\r\n\
             Message-ID: {message_id}\r\n\r\nretried until the mailbox is free\r\n.\r\n"
        );
        self.fleet
            .submit_one(&format!("MAIL FROM:<{SENDER}>"), &[RCPT], data.as_bytes())
    }

    /// The events of queue id `qid`, in stream order.
    fn events_of(&self, qid: &str) -> Vec<Event> {
        events(&self.fleet.nats.url())
            .into_iter()
            .filter(|e| e.queue_id == qid)
            .collect()
    }

    fn logs(&self) -> String {
        self.fleet.logs()
    }
}

fn of_kind(events: &[Event], kind: EventKind) -> Vec<&Event> {
    events.iter().filter(|e| e.kind == kind).collect()
}

/// The delay Herald waits after attempt `n` failed: `initial * 2^(n-1)`, capped at `max`
/// (before jitter).
fn backoff(n: u32) -> Duration {
    let factor = 2u32.saturating_pow(n.saturating_sub(1).min(30));
    RETRY_INITIAL.saturating_mul(factor).min(RETRY_MAX)
}

fn timeline(events: &[Event], rcpts: &[&MxEvent]) -> String {
    let mut out = String::new();
    for e in events {
        out += &format!(
            "  seq {:>3} {:<9} attempt {} at {} reply {} {:?} remote {:?} site {:?} \
             source {:?} {} ms\n",
            e.seq,
            e.kind.word(),
            e.attempt,
            e.at,
            e.reply_code,
            e.enhanced_code,
            e.remote_host,
            e.site,
            e.source_ip,
            e.duration_ms,
        );
    }
    let t0 = rcpts.first().map_or(0.0, |e| e.t);
    for (i, e) in rcpts.iter().enumerate() {
        out += &format!(
            "  MX RCPT #{} at +{:.3} s -> {:?}\n",
            i + 1,
            e.t - t0,
            e.reply_code()
        );
    }
    out
}

#[test]
fn deferrals_follow_the_backoff_and_show_in_the_events() {
    require_netns();
    let s = Setup::start("retry-events");
    let message_id = format!("<retry-events-{}@example.test>", std::process::id());
    let qid = s.submit(&message_id);

    // Keep refusing until the sender has been warned: with the warning due 3 s after
    // acceptance and retries 2 s then 4 s apart, that takes two or three deferrals.
    let warned = wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        let ev = s.events_of(&qid);
        (of_kind(&ev, EventKind::Deferred).len() >= 2
            && !of_kind(&ev, EventKind::Delayed).is_empty())
        .then_some(())
    });
    assert!(
        warned.is_some(),
        "no two deferrals and a delay warning within 30 s; events of {qid}:\n{}\n{}",
        timeline(&s.events_of(&qid), &[]),
        s.logs()
    );
    s.fleet.mx("dest.test").set_control(json!({}));

    let delivered = wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        let ev = s.events_of(&qid);
        (!of_kind(&ev, EventKind::Delivered).is_empty()).then_some(())
    });
    assert!(
        delivered.is_some(),
        "not delivered after the MX accepted; events of {qid}:\n{}\n{}",
        timeline(&s.events_of(&qid), &[]),
        s.logs()
    );
    // Anything extra (a second delivery, a second warning) would show up within this.
    thread::sleep(Duration::from_secs(3));

    let events = s.events_of(&qid);
    let mx_events = s.fleet.mx("dest.test").events();
    let rcpts: Vec<&MxEvent> = mx_events
        .iter()
        .filter(|e| e.ev == "rcpt" && e.to.as_deref() == Some(RCPT))
        .collect();
    let shown = timeline(&events, &rcpts);
    eprintln!("attempt timeline of {qid}:\n{shown}");
    let ctx = format!("events of {qid}:\n{shown}\n{}", s.logs());

    // One deferred event per attempt, numbered from 1, each naming the MX and its reply.
    let deferred = of_kind(&events, EventKind::Deferred);
    assert!(deferred.len() >= 2, "{ctx}");
    let attempts: Vec<u32> = deferred.iter().map(|e| e.attempt).collect();
    let expected: Vec<u32> = (1..=deferred.len() as u32).collect();
    assert_eq!(attempts, expected, "deferred attempts\n{ctx}");
    let mx_name = format!("mx.dest.test [{}]", s.fleet.mx_ip("dest.test"));
    for e in &deferred {
        assert_eq!(e.reply_code, 450, "{e:?}\n{ctx}");
        assert_eq!(e.enhanced_code, "4.2.1", "{e:?}\n{ctx}");
        assert!(e.reply_text.contains("Mailbox busy"), "{e:?}\n{ctx}");
        assert_eq!(e.remote_host, mx_name, "{e:?}\n{ctx}");
        assert_eq!(e.recipients, [RCPT], "{e:?}\n{ctx}");
        assert_eq!(e.sender, SENDER, "{e:?}\n{ctx}");
        // Herald records the Message-ID without its angle brackets.
        assert_eq!(
            e.message_id,
            message_id.trim_matches(['<', '>']),
            "{e:?}\n{ctx}"
        );
        assert_eq!(e.domain, "dest.test", "{e:?}\n{ctx}");
    }

    // The schedule: attempt n+1 comes no sooner than backoff(n) minus the jitter. The
    // event's `at` has whole seconds only, so it can just show that much of the gap; the
    // MX's RCPT times are exact. Both refused and accepted RCPTs count: the last gap is
    // the one to the delivering attempt.
    assert_eq!(
        rcpts.len(),
        deferred.len() + 1,
        "one RCPT per attempt at the MX\n{ctx}"
    );
    for (i, pair) in deferred.windows(2).enumerate() {
        let n = i as u32 + 1;
        let least = backoff(n).as_secs_f64() * (1.0 - JITTER);
        let at_gap = pair[1].at - pair[0].at;
        assert!(
            at_gap >= least.floor() as i64,
            "attempt {} came {at_gap} s (event time) after attempt {n}, backoff {:?}\n{ctx}",
            n + 1,
            backoff(n)
        );
    }
    let mut too_soon = Vec::new();
    for (i, pair) in rcpts.windows(2).enumerate() {
        let n = i as u32 + 1;
        let gap = pair[1].t - pair[0].t;
        let least = backoff(n).as_secs_f64() * (1.0 - JITTER);
        if gap < least {
            too_soon.push(format!(
                "attempt {} came {gap:.3} s after attempt {n}; backoff {:?} -10 % is {least:.1} s",
                n + 1,
                backoff(n)
            ));
        }
    }
    // `too_soon` is asserted at the end, so that a broken schedule does not hide how the
    // rest of the story went.

    // Then delivered, by the attempt after the last deferral.
    let delivered = of_kind(&events, EventKind::Delivered);
    assert_eq!(delivered.len(), 1, "{ctx}");
    let last = deferred.last().expect("at least two deferrals");
    let d = delivered[0];
    assert_eq!(d.attempt, last.attempt + 1, "{ctx}");
    assert!(
        d.duration_ms > 0,
        "delivered event without a duration\n{ctx}"
    );
    assert_eq!(d.reply_code / 100, 2, "{d:?}\n{ctx}");
    assert_eq!(d.remote_host, mx_name, "{ctx}");
    assert_eq!(d.recipients, [RCPT], "{ctx}");
    assert!(d.at >= last.at, "{ctx}");
    assert!(
        of_kind(&events, EventKind::Bounced).is_empty()
            && of_kind(&events, EventKind::Expired).is_empty(),
        "{ctx}"
    );

    // One delay warning: an event at one of the deferrals, and one DSN at the sender's MX.
    let delayed = of_kind(&events, EventKind::Delayed);
    assert_eq!(delayed.len(), 1, "{ctx}");
    assert!(attempts.contains(&delayed[0].attempt), "{ctx}");
    assert_eq!(delayed[0].recipients, [RCPT], "{ctx}");
    let dsn_data: Vec<&MxEvent> = mx_events
        .iter()
        .filter(|e| e.is_accepted_data() && e.rcpts.iter().any(|r| r == SENDER))
        .collect();
    assert_eq!(dsn_data.len(), 1, "one message to the sender\n{ctx}");
    // aiosmtpd reports the null reverse path as written.
    assert!(
        matches!(dsn_data[0].from.as_deref(), Some("" | "<>")),
        "a DSN comes from the null sender: {:?}\n{ctx}",
        dsn_data[0].from
    );
    let dsns: Vec<Vec<u8>> = s
        .fleet
        .mx("dest.test")
        .messages()
        .into_iter()
        .filter(|m| String::from_utf8_lossy(m).contains(DSN_SUBJECT))
        .collect();
    assert_eq!(dsns.len(), 1, "{ctx}");
    let dsn = &dsns[0];
    let text = String::from_utf8_lossy(dsn).to_string();
    let content_type = header_values(dsn, "Content-Type").join(" ");
    assert!(
        content_type.contains("multipart/report")
            && content_type.contains("delivery-status")
            && content_type.contains("report-type"),
        "{content_type}\n{text}"
    );
    assert!(
        header_values(dsn, "To").iter().any(|t| t.contains(SENDER)),
        "{text}"
    );
    for needle in [
        "Content-Type: message/delivery-status",
        "Action: delayed",
        &format!("Final-Recipient: rfc822; {RCPT}"),
        "Status: 4.2.1",
        "Will-Retry-Until: ",
        "Diagnostic-Code: smtp; 450 4.2.1",
    ] {
        assert!(text.contains(needle), "DSN lacks {needle:?}:\n{text}");
    }
    assert!(
        !text.contains("Action: failed"),
        "a warning is not a bounce:\n{text}"
    );
    // Without the 'X-Recording-Peer' line the MX adds in front.
    let stored = dsn
        .splitn(2, |&b| b == b'\n')
        .nth(1)
        .expect("the MX's first line ends");
    let (ok, report) = dkim_verify(stored, &s.fleet.dns);
    assert!(ok, "the DSN is DKIM-signed for example.test:\n{report}");

    // The message itself, exactly once.
    let counts = s.fleet.mx("dest.test").message_id_counts();
    assert_eq!(counts.get(&message_id), Some(&1), "{counts:?}\n{ctx}");

    assert!(
        too_soon.is_empty(),
        "retries earlier than the schedule:\n{}\n{ctx}",
        too_soon.join("\n")
    );
}
