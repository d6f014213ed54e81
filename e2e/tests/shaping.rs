//! Traffic shaping across delivery processes, measured at the receiving end: three `herald
//! delivery` processes share one queue and must together keep a site's connection and
//! rate limits, all stop connecting to a site that answered "421 too many connections"
//! (while other mail flows on undisturbed), and move mail to another source of the pool
//! once a warming source reaches its daily cap.

use std::net::{IpAddr, Ipv4Addr};
use std::thread;
use std::time::{Duration, Instant};

use herald_e2e::{
    Fleet, FleetOptions, MxEvent, max_concurrent_connections, max_in_window, message_ids,
    require_netns, unique_ip, wait_until,
};

/// Three delivery processes, `dest.test` (the site under test) and `other.test` (a site
/// nothing limits), each with a recording MX.
fn start(name: &str, delivery_yaml: &str) -> Fleet {
    Fleet::start(
        name,
        FleetOptions {
            domains: &["dest.test", "other.test"],
            delivery_yaml,
            ..Default::default()
        },
    )
}

/// Seconds from queueing to acceptance at the MX, per message.
fn latencies(mx_events: &[MxEvent], ids: &[String], queued: &[f64]) -> Vec<f64> {
    ids.iter()
        .zip(queued)
        .filter_map(|(id, q)| {
            mx_events
                .iter()
                .find(|e| e.is_accepted_data() && e.message_id.as_deref() == Some(id))
                .map(|e| e.t - q)
        })
        .collect()
}

#[test]
fn three_processes_keep_a_sites_connection_and_rate_limits() {
    require_netns();
    let source = unique_ip();
    let shaping = start(
        "shaping-limits",
        &format!(
            "{{concurrency: 8, sources: [{{name: a, address: {source}}}], \
             shaping: {{wait_backoff_max: 4s, providers: [{{name: dest, \
             mx_suffixes: [dest.test], max_connections: 2, max_rate: 5, \
             max_messages_per_connection: 50}}]}}}}"
        ),
    );
    let ids = message_ids("limits", 300);
    let started = Instant::now();
    let addr_submit = {
        let chunks: Vec<Vec<String>> = ids.chunks(100).map(|c| c.to_vec()).collect();
        // Three submitters so that all 300 are queued long before they can be delivered.
        thread::scope(|s| {
            for chunk in &chunks {
                let shaping = &shaping;
                s.spawn(move || shaping.submit_all("user@dest.test", chunk));
            }
        });
        started.elapsed()
    };
    // Meanwhile, mail to an unlimited site is not held up behind the 300.
    thread::sleep(Duration::from_secs(5));
    let others = message_ids("limits-other", 20);
    let queued = shaping.submit_all("user@other.test", &others);
    shaping.wait_all("other.test", &others, Duration::from_secs(30));
    let other_latency = latencies(&shaping.mx("other.test").events(), &others, &queued);
    let slowest_other = other_latency.iter().cloned().fold(0.0, f64::max);
    shaping.wait_all("dest.test", &ids, Duration::from_secs(120));
    let drained = started.elapsed();
    let events = shaping.mx("dest.test").events();
    let accepted: Vec<f64> = events
        .iter()
        .filter(|e| e.is_accepted_data())
        .map(|e| e.t)
        .collect();
    let mails: Vec<f64> = events
        .iter()
        .filter(|e| e.ev == "mail")
        .map(|e| e.t)
        .collect();
    let most_connections = max_concurrent_connections(&events, None);
    let most_per_second = max_in_window(&mails, 1.0);
    let connections = events.iter().filter(|e| e.ev == "connect").count();
    let peers: Vec<IpAddr> = herald_e2e::data_by_peer(&events).into_keys().collect();
    eprintln!(
        "300 messages queued in {addr_submit:?}, drained in {drained:?}: {} accepted, \
         {connections} connections, at most {most_connections} at once, at most \
         {most_per_second} MAIL commands in any 1 s window, peers {peers:?}",
        accepted.len()
    );
    eprintln!("other.test meanwhile: slowest of 20 took {slowest_other:.3}s");
    assert_eq!(accepted.len(), 300, "each message exactly once");
    assert!(
        slowest_other < 3.0,
        "mail to other.test waited {other_latency:?} behind the throttled site"
    );
    assert!(
        most_connections <= 2,
        "{most_connections} connections at once"
    );
    assert!(
        most_per_second <= 5,
        "{most_per_second} messages in one second"
    );
    assert_eq!(
        peers,
        vec![IpAddr::V4(source)],
        "sent from the configured source"
    );
    // Connections were reused: far fewer than messages.
    assert!(
        connections <= 300 / 10,
        "{connections} connections for 300 messages"
    );
    // All three processes took part.
    for d in &shaping.deliveries {
        assert!(
            d.log().contains("delivered"),
            "{} delivered nothing\n{}",
            d.name(),
            shaping.logs()
        );
    }
}

#[test]
fn a_421_storm_suspends_the_site_for_every_process_and_other_mail_flows_on() {
    require_netns();
    let shaping = start(
        "shaping-421",
        "{concurrency: 4, shaping: {rules: [{name: too-many-connections, code: 421, \
         text: '(?i)too many connections', threshold: 3, window: 10m, action: suspend, \
         duration: 60s}]}}",
    );
    // Baseline: how long mail to other.test takes when nothing else happens.
    let before = message_ids("before", 10);
    let queued = shaping.submit_all("user@other.test", &before);
    shaping.wait_all("other.test", &before, Duration::from_secs(30));
    let baseline = latencies(&shaping.mx("other.test").events(), &before, &queued);

    // dest.test's MX now turns every connection away.
    shaping
        .mx("dest.test")
        .set_control(serde_json::json!({"greeting": "421 4.7.0 Too many connections, slow down"}));
    let blocked = message_ids("blocked", 10);
    shaping.submit_all("user@dest.test", &blocked);
    let refused = |events: &[MxEvent]| events.iter().filter(|e| e.ev == "refused").count();
    wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
        shaping
            .deliveries
            .iter()
            .any(|d| d.log().contains("suspending source for site"))
            .then_some(())
    })
    .unwrap_or_else(|| panic!("no suspension after 421s\n{}", shaping.logs()));
    // Connections already on their way when the third 421 came may still land.
    thread::sleep(Duration::from_secs(2));
    let at_suspension = refused(&shaping.mx("dest.test").events());

    // While suspended: mail to other.test is as fast as before; dest.test sees nobody,
    // although its ten entries are due for retry every second or two.
    let during = message_ids("during", 10);
    let queued = shaping.submit_all("user@other.test", &during);
    shaping.wait_all("other.test", &during, Duration::from_secs(30));
    let while_suspended = latencies(&shaping.mx("other.test").events(), &during, &queued);
    thread::sleep(Duration::from_secs(6));
    let later = refused(&shaping.mx("dest.test").events());
    let max = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    eprintln!(
        "421s before the suspension took hold: {at_suspension}, after: {}; other.test \
         latency before {:.3}s max / during {:.3}s max",
        later - at_suspension,
        max(&baseline),
        max(&while_suspended)
    );
    assert!(
        at_suspension >= 3,
        "suspended after {at_suspension} refusals"
    );
    assert_eq!(
        later,
        at_suspension,
        "a delivery process connected to the suspended site\n{}",
        shaping.logs()
    );
    assert_eq!(while_suspended.len(), 10);
    assert!(
        max(&while_suspended) <= max(&baseline) + 1.0,
        "other.test slowed down during the suspension: {while_suspended:?} vs {baseline:?}"
    );
    // Nothing to dest.test was lost or bounced: it is still queued, waiting.
    assert!(
        shaping.mx("dest.test").message_id_counts().is_empty(),
        "dest.test accepted mail while refusing connections?"
    );
    for d in &shaping.deliveries {
        assert!(!d.log().contains("permanent failure"), "{}", shaping.logs());
    }
}

#[test]
fn a_warming_source_hands_over_at_its_daily_cap() {
    require_netns();
    let (fresh, seasoned): (Ipv4Addr, Ipv4Addr) = (unique_ip(), unique_ip());
    let shaping = start(
        "shaping-warmup",
        &format!(
            "{{concurrency: 4, sources: [{{name: fresh, address: {fresh}, warmup: true}}, \
             {{name: seasoned, address: {seasoned}}}], \
             pools: {{main: [{{source: fresh, weight: 9}}, {{source: seasoned, weight: 1}}]}}, \
             default_pool: main, warmup: {{schedule: [20, 100]}}}}"
        ),
    );
    let ids = message_ids("warmup", 40);
    shaping.submit_all("user@dest.test", &ids);
    shaping.wait_all("dest.test", &ids, Duration::from_secs(60));
    let by_peer = herald_e2e::data_by_peer(&shaping.mx("dest.test").events());
    eprintln!("messages per source: {by_peer:?}");
    assert_eq!(by_peer.get(&IpAddr::V4(fresh)), Some(&20), "{by_peer:?}");
    assert_eq!(by_peer.get(&IpAddr::V4(seasoned)), Some(&20), "{by_peer:?}");
}
