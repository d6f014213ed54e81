//! SmtpAccount policy scenarios: the hourly limit held across pods, client networks that
//! authenticate without a password, and the headers an account adds to its mail.

use std::{thread, time::Duration};

use herald_e2e::{
    Swaks, SwaksOutput, WORLD_ACCOUNT, WORLD_PASSWORD, World, WorldOptions, dkim_verify,
    header_values, require_netns,
};

fn unix_hour() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() / 3600)
        .unwrap_or(0)
}

#[derive(Debug, Default, PartialEq)]
struct Tally {
    queued: usize,
    held: usize,
    refused: usize,
}

fn tally(outs: &[SwaksOutput]) -> Tally {
    let mut t = Tally::default();
    for o in outs {
        if o.contains("held until") {
            t.held += 1;
        } else if o.contains("250 2.0.0 Ok: queued as") {
            t.queued += 1;
        } else if o.contains(
            "451 4.7.1 Hourly limit of 10 messages reached for account default/app; retry after",
        ) {
            t.refused += 1;
        } else {
            panic!("unexpected outcome:\n{}", o.text());
        }
    }
    t
}

/// 15 messages alternating between two ingress pods, limit 10/hour with 20 % tolerance:
/// 10 accepted, 2 accepted and held to the next hour, 3 refused. The count lives in NATS KV,
/// so neither pod can let more through than the account's plan.
#[test]
fn hourly_limit_holds_across_two_ingress_pods() {
    require_netns();
    // An hour boundary in the middle would reset the count: then the run is repeated.
    for _ in 0..2 {
        let start_hour = unix_hour();
        let world = World::start_with(
            "hourly",
            WorldOptions {
                account_spec: Some("{hourlyLimit: 10, burstTolerancePercent: 20}".into()),
                ..Default::default()
            },
        );
        let (_pod_b, addr_b) = world.another_ingress("ingress-b", &[]);
        let mut outs = Vec::new();
        for i in 0..15 {
            let client = if i % 2 == 0 {
                world.app()
            } else {
                Swaks::new(addr_b.ip(), addr_b.port()).auth_plain(WORLD_ACCOUNT, WORLD_PASSWORD)
            };
            outs.push(
                client
                    .from("sender@example.test")
                    .to("user@example.test")
                    .header(&format!("Subject: hourly-{i}"))
                    .run(),
            );
        }
        if unix_hour() != start_hour {
            continue;
        }
        let t = tally(&outs);
        println!("hourly limit: {t:?}");
        assert_eq!(
            t,
            Tally {
                queued: 10,
                held: 2,
                refused: 3
            }
        );
        // The 10 are delivered now; the 2 held wait for the next hour.
        herald_e2e::wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
            (world.arrived("hourly-") >= 10).then_some(())
        })
        .unwrap_or_else(|| panic!("not all 10 arrived\n{}", world.logs()));
        thread::sleep(Duration::from_secs(3));
        assert_eq!(
            world.arrived("hourly-"),
            10,
            "held messages were delivered early"
        );
        return;
    }
    panic!("two hour boundaries in two runs");
}

#[test]
fn client_network_sends_without_auth_and_is_accounted_to_its_account() {
    require_netns();
    let world = World::start_with(
        "client-net",
        WorldOptions {
            account_spec: Some(
                "{clientNetworks: [127.77.0.0/16], hourlyLimit: 1, burstTolerancePercent: 0}"
                    .into(),
            ),
            ..Default::default()
        },
    );
    let from_network = || {
        Swaks::new(world.submission.ip(), world.submission.port())
            .starttls()
            .arg("--local-interface")
            .arg("127.77.0.5")
            .from("sender@example.test")
            .to("user@example.test")
    };
    let first = from_network().header("Subject: client-net-1").run();
    assert!(
        first.contains("250 2.0.0 Ok: queued as"),
        "{}",
        first.text()
    );
    // Bound to the account: its limit of one applies.
    let second = from_network().header("Subject: client-net-2").run();
    assert!(
        second.contains("451 4.7.1 Hourly limit of 1 messages reached for account default/app"),
        "{}",
        second.text()
    );
    // Outside the network, without AUTH: refused.
    let outside = Swaks::new(world.submission.ip(), world.submission.port())
        .starttls()
        .from("sender@example.test")
        .to("user@example.test")
        .run();
    assert!(outside.contains("530 5.7.0"), "{}", outside.text());
    world.wait_arrival("client-net-1", Duration::from_secs(30));
    let msg = world
        .mx
        .maildir_messages()
        .into_iter()
        .find(|m| String::from_utf8_lossy(m).contains("client-net-1"))
        .expect("arrived");
    assert_eq!(header_values(&msg, "X-Herald-Account"), vec!["default/app"]);
}

#[test]
fn sender_defaults_and_footer_are_added_and_the_message_still_passes_dkim() {
    require_netns();
    let world = World::start_with(
        "defaults",
        WorldOptions {
            account_spec: Some(
                "{senderDefaults: {replyTo: support@example.test, readReceiptTo: receipts@example.test, \
                 identificationHeader: X-Sender-Account, unsubscribeUrl: 'https://u.example.test/{account}/{queue_id}', \
                 hideClientIp: true, footer: {text: 'Sent with Herald for Example'}}}"
                    .into(),
            ),
            ..Default::default()
        },
    );
    let id = world.submit("defaults-marker");
    world.wait_arrival("defaults-marker", Duration::from_secs(30));
    let msg = world
        .mx
        .maildir_messages()
        .into_iter()
        .find(|m| String::from_utf8_lossy(m).contains("defaults-marker"))
        .expect("arrived");
    let text = String::from_utf8_lossy(&msg).to_string();
    assert_eq!(
        header_values(&msg, "Reply-To"),
        vec!["support@example.test"],
        "{text}"
    );
    assert_eq!(
        header_values(&msg, "Disposition-Notification-To"),
        vec!["receipts@example.test"]
    );
    assert_eq!(header_values(&msg, "X-Sender-Account"), vec!["default/app"]);
    assert_eq!(
        header_values(&msg, "List-Unsubscribe"),
        vec![format!("<https://u.example.test/default/app/{id}>")]
    );
    assert_eq!(
        header_values(&msg, "List-Unsubscribe-Post"),
        vec!["List-Unsubscribe=One-Click"]
    );
    let received = header_values(&msg, "Received");
    let ours = received
        .iter()
        .find(|r| r.contains("(Herald)"))
        .expect("Herald's Received header");
    assert!(!ours.contains("[127."), "client IP hidden: {ours}");
    assert!(
        text.contains("Sent with Herald for Example"),
        "footer missing:\n{text}"
    );
    let (ok, report) = dkim_verify(&msg, &world.dns);
    assert!(
        ok,
        "DKIM after the added headers and footer:\n{report}\n{text}"
    );
}
