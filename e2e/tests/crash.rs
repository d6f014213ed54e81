//! A delivery pod dying with entries in flight: two `herald delivery` processes share the
//! queue, one is SIGKILLed while both are busy, and the recording MX must end up with every
//! message. Duplicates are tolerated (at-least-once), but only as many as the dead process
//! could have had in flight.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::thread;
use std::time::{Duration, Instant};

use herald_e2e::{
    Fleet, FleetOptions, MxEvent, message_ids, require_netns, submit, unix_now, wait_until,
};

const MESSAGES: usize = 200;
/// Entries one delivery process works on at once: the most it can have in flight.
const CONCURRENCY: usize = 8;
/// Short, so that what the dead process held comes back within seconds.
const ACK_WAIT: Duration = Duration::from_secs(3);
/// Submission connections (ingress allows 10 per client IP).
const SUBMITTERS: usize = 4;
const ALL_ARRIVED: Duration = Duration::from_secs(90);

/// Two delivery processes; the MX takes a moment (`data_delay`) before answering each end
/// of DATA so that transactions are open when the kill comes.
fn start(name: &str) -> Fleet {
    let yaml = format!("{{concurrency: {CONCURRENCY}}}");
    let fleet = Fleet::start(
        name,
        FleetOptions {
            deliveries: &["delivery-a", "delivery-b"],
            delivery_yaml: &yaml,
            ack_wait: ACK_WAIT,
            ..Default::default()
        },
    );
    fleet
        .mx("dest.test")
        .set_control(serde_json::json!({"data_delay": 0.1}));
    fleet
}

/// Transactions that got as far as MAIL FROM but never to an accepted end of DATA: those
/// the kill cut off (nothing else fails in this scenario).
fn cut_off(events: &[MxEvent]) -> usize {
    let mut mails: BTreeMap<u64, usize> = BTreeMap::new();
    for e in events {
        if e.ev == "mail" {
            *mails.entry(e.conn).or_insert(0) += 1;
        } else if e.is_accepted_data() {
            *mails.entry(e.conn).or_insert(0) -= 1;
        }
    }
    mails.values().sum()
}

/// Connections open at the MX at time `t` (both delivery processes together).
fn open_at(events: &[MxEvent], t: f64) -> usize {
    let opened = events
        .iter()
        .filter(|e| e.ev == "connect" && e.t <= t)
        .count();
    let closed = events
        .iter()
        .filter(|e| e.ev == "close" && e.t <= t)
        .count();
    opened.saturating_sub(closed)
}

#[test]
fn sigkill_of_one_delivery_process_mid_batch_loses_nothing() {
    require_netns();
    let started = Instant::now();
    let mut crash = start("crash-sigkill-batch");
    let ids = message_ids("crash", MESSAGES);

    // Submission runs alongside, on several connections so that it outpaces delivery:
    // both processes then have all their slots busy when the kill lands.
    let addr = crash.submission;
    let submitters: Vec<_> = ids
        .chunks(MESSAGES.div_ceil(SUBMITTERS))
        .map(|chunk| {
            let chunk = chunk.to_vec();
            thread::spawn(move || {
                submit(addr, "user@dest.test", &chunk)
                    .into_iter()
                    .filter_map(Result::err)
                    .collect::<Vec<String>>()
            })
        })
        .collect();

    let third = MESSAGES / 3;
    let before_kill = wait_until(ALL_ARRIVED, Duration::from_millis(20), || {
        let n = crash.mx("dest.test").message_id_counts().len();
        (n >= third).then_some(n)
    })
    .unwrap_or_else(|| panic!("not even {third} messages arrived\n{}", crash.logs()));
    let killed_at = unix_now();
    let victim = &mut crash.deliveries[0];
    victim.kill_9();
    let victim_name = victim.name().to_string();
    let open_then = open_at(&crash.mx("dest.test").events(), killed_at);
    eprintln!(
        "killed {victim_name} after {:?}: {before_kill} distinct messages had arrived, \
         {open_then} connections open at the MX",
        started.elapsed()
    );
    assert!(
        before_kill < MESSAGES,
        "everything had arrived before the kill: the scenario tested nothing"
    );

    let refused: Vec<String> = submitters
        .into_iter()
        .flat_map(|s| s.join().expect("submitter thread"))
        .collect();
    assert!(
        refused.is_empty(),
        "submissions not queued: {refused:?}\n{}",
        crash.logs()
    );

    crash.wait_all("dest.test", &ids, ALL_ARRIVED);
    // Whatever the dead process left unacknowledged is redelivered one ack wait after its
    // last progress; give stragglers that long to show up before counting duplicates.
    thread::sleep(ACK_WAIT + Duration::from_secs(1));

    let counts = crash.mx("dest.test").message_id_counts();
    let strangers: Vec<&String> = counts.keys().filter(|id| !ids.contains(id)).collect();
    assert!(strangers.is_empty(), "unknown Message-IDs: {strangers:?}");
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    let events = crash.mx("dest.test").events();
    let peers: Vec<IpAddr> = herald_e2e::data_by_peer(&events).into_keys().collect();
    eprintln!(
        "delivered {} distinct, {duplicates} duplicates, killed process had {CONCURRENCY} \
         in flight at most ({} transactions cut off at the MX; peers {peers:?}; {:?} in all)",
        counts.len(),
        cut_off(&events),
        started.elapsed()
    );
    let twice: Vec<(&String, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        duplicates <= CONCURRENCY,
        "{duplicates} duplicate deliveries, more than the {CONCURRENCY} the killed process \
         could have had in flight: {twice:?}\n{}",
        crash.logs()
    );
    assert!(
        crash.deliveries[1].is_running(),
        "the surviving delivery process died\n{}",
        crash.logs()
    );
}
