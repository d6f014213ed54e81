//! The shaping state against a real nats-server with JetStream: three `SharedState`
//! handles stand for three delivery pods, and the limits must hold across them.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use herald_delivery::shaping::{SharedState, Suspension, now_ms};

/// nats-server with JetStream in a temp dir of its own (the e2e harness's), stopped on
/// drop; fields drop in order, the directory last.
struct Server {
    nats: herald_e2e::Nats,
    _scenario: herald_e2e::Scenario,
}

fn start_nats() -> Server {
    let scenario = herald_e2e::Scenario::new("shared-state");
    Server {
        nats: herald_e2e::Nats::start(&scenario),
        _scenario: scenario,
    }
}

async fn pods(server: &Server, n: usize) -> Vec<SharedState> {
    let mut out = Vec::new();
    for _ in 0..n {
        let client = async_nats::connect(server.nats.url())
            .await
            .expect("connect");
        let js = async_nats::jetstream::new(client);
        out.push(
            SharedState::setup(&js, 1, Duration::from_secs(60), Duration::from_secs(3600))
                .await
                .expect("buckets"),
        );
    }
    out
}

/// Polls `f` every 10 ms for up to 2 s until it returns `Some`.
async fn eventually<T, F, Fut>(mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    for _ in 0..200 {
        if let Some(v) = f().await {
            return Some(v);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// The shaping bucket through a client of its own, as another pod or an operator sees it.
async fn shaping_bucket(server: &Server) -> async_nats::jetstream::kv::Store {
    let client = async_nats::connect(server.nats.url())
        .await
        .expect("connect");
    async_nats::jetstream::new(client)
        .get_key_value("HERALD_SHAPING")
        .await
        .expect("bucket")
}

/// Writes a suspension for a minute under `key`; returns its end (Unix ms).
async fn put_suspension(kv: &async_nats::jetstream::kv::Store, key: &str, rule: &str) -> i64 {
    let until = now_ms() + 60_000;
    let suspension = serde_json::json!({"until_ms": until, "rule": rule, "reply": "by hand"});
    kv.put(key, serde_json::to_vec(&suspension).expect("json").into())
        .await
        .expect("put");
    until
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mirror_follows_writes_made_outside_the_pod() {
    let server = start_nats();
    let pod = pods(&server, 1).await.remove(0);
    eventually(|| async { pod.mirror_is_live().then_some(()) })
        .await
        .expect("the mirror catches up with an empty bucket");
    // Another pod (or an operator with `nats kv put`) writes and deletes the keys.
    let kv = shaping_bucket(&server).await;
    let until = put_suspension(&kv, "susp.src.p.prov", "manual").await;
    let seen = eventually(|| async {
        pod.suspension("src", "any-site", "prov")
            .await
            .expect("read")
    })
    .await
    .expect("a provider-wide suspension reaches the mirror");
    assert_eq!((seen.until_ms, seen.rule.as_str()), (until, "manual"));
    kv.delete("susp.src.p.prov").await.expect("delete");
    eventually(|| async {
        pod.suspension("src", "any-site", "prov")
            .await
            .expect("read")
            .is_none()
            .then_some(())
    })
    .await
    .expect("a lifted suspension leaves the mirror");
    // A cut rate written elsewhere limits this pod's unlimited site too.
    kv.put(
        "rate.src.site",
        serde_json::to_vec(&serde_json::json!({"tat_ms": 0, "factor": 0.25}))
            .expect("json")
            .into(),
    )
    .await
    .expect("put");
    let factor = eventually(|| async {
        let (_, f) = pod
            .take_rate("src", "site", None, 10.0)
            .await
            .expect("rate");
        (f < 1.0).then_some(f)
    })
    .await
    .expect("the cut reaches the mirror");
    assert_eq!(factor, 0.25);
    assert!(pod.mirror_is_live());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mirror_follows_again_after_nats_restarts() {
    // A mirror that stayed "current" while its watch had silently died would hide every
    // later suspension from this pod: after a restart it must follow writes again.
    let server = start_nats();
    let pod = pods(&server, 1).await.remove(0);
    eventually(|| async { pod.mirror_is_live().then_some(()) })
        .await
        .expect("live");
    let server = tokio::task::spawn_blocking(move || {
        let mut server = server;
        server.nats.stop();
        server.nats.start_again();
        server
    })
    .await
    .expect("restart");
    let kv = shaping_bucket(&server).await;
    put_suspension(&kv, "susp.src.s.site", "after-restart").await;
    let mut seen = None;
    // The client reconnects with back-off and a broken watch restarts after a second.
    for _ in 0..10 {
        seen = eventually(|| async { pod.suspension("src", "site", "prov").await.ok().flatten() })
            .await;
        if seen.is_some() {
            break;
        }
    }
    let seen = seen.expect("a suspension written after the restart reaches the pod");
    assert_eq!(seen.rule, "after-restart");
    // And once the mirror serves reads again, it is following, not frozen.
    let mut live = false;
    for _ in 0..10 {
        if eventually(|| async { pod.mirror_is_live().then_some(()) })
            .await
            .is_some()
        {
            live = true;
            break;
        }
    }
    assert!(live, "the mirror never caught up after the restart");
    kv.delete("susp.src.s.site").await.expect("delete");
    eventually(|| async {
        (pod.mirror_is_live()
            && pod
                .suspension("src", "site", "prov")
                .await
                .expect("read")
                .is_none())
        .then_some(())
    })
    .await
    .expect("the live mirror saw the suspension lifted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_slots_hold_across_pods() {
    let server = start_nats();
    let pods = pods(&server, 3).await;
    let open = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let granted = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..24 {
        let pod = pods[i % 3].clone();
        let (open, most, granted) = (open.clone(), most.clone(), granted.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                if let Some(slot) = pod.claim_slot("src", "site", 2).await.expect("claim") {
                    let now = open.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(15)).await;
                    open.fetch_sub(1, Ordering::SeqCst);
                    pod.release_slot(slot).await;
                    granted.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    assert_eq!(granted.load(Ordering::SeqCst), 24);
    assert_eq!(
        most.load(Ordering::SeqCst),
        2,
        "never more than 2 slots at once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_rate_is_spaced_across_pods() {
    let server = start_nats();
    let pods = pods(&server, 3).await;
    let grants = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for pod in pods {
        let grants = grants.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..8 {
                loop {
                    let (wait, _) = pod
                        .take_rate("src", "site", Some(20.0), 10.0)
                        .await
                        .expect("rate");
                    match wait {
                        None => break,
                        Some(w) => tokio::time::sleep(w).await,
                    }
                }
                grants.lock().expect("lock").push(now_ms());
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let mut g = grants.lock().expect("lock").clone();
    g.sort();
    assert_eq!(g.len(), 24);
    // 20/s with the 5 % margin: grants 52.5 ms apart. The clock is read when take_rate
    // returns, some scheduling delay after the grant itself, so on a busy machine a single
    // gap can look a few ms short; 23 gaps together cannot, and a limiter that let two
    // pods through at once would show a gap near 0.
    for w in g.windows(2) {
        assert!(w[1] - w[0] >= 45, "grants too close: {g:?}");
    }
    let span = g[23] - g[0];
    assert!(span >= 23 * 52, "24 grants within {span} ms: {g:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspensions_rules_and_warmup_are_shared() {
    let server = start_nats();
    let pods = pods(&server, 3).await;
    // A suspension written by one pod is seen by another (through its mirror: within
    // milliseconds).
    assert!(
        pods[1]
            .suspension("src", "site", "prov")
            .await
            .expect("read")
            .is_none()
    );
    pods[0]
        .suspend(
            "src",
            "site",
            "prov",
            false,
            Suspension {
                until_ms: now_ms() + 60_000,
                rule: "too-many-connections".into(),
                reply: "421 4.7.0 Too many connections".into(),
            },
        )
        .await
        .expect("suspend");
    let s = eventually(|| async {
        pods[2]
            .suspension("src", "site", "prov")
            .await
            .expect("read")
    })
    .await
    .expect("suspended");
    assert_eq!(s.rule, "too-many-connections");
    // Another site of the same source is not affected; a provider-wide one would be.
    assert!(
        pods[2]
            .suspension("src", "other", "prov2")
            .await
            .expect("read")
            .is_none()
    );

    // Three hits from three pods reach a threshold of 3, once.
    let w = Duration::from_secs(600);
    assert!(!pods[0].hit("src", "site", "r", 3, w).await.expect("hit"));
    assert!(!pods[1].hit("src", "site", "r", 3, w).await.expect("hit"));
    assert!(pods[2].hit("src", "site", "r", 3, w).await.expect("hit"));
    assert!(!pods[0].hit("src", "site", "r", 3, w).await.expect("hit"));

    // A warm-up cap of 20 allows exactly 20 messages, whichever pod sends them.
    let cap = pods[0]
        .warmup_cap("new", &[20, 100])
        .await
        .expect("cap")
        .expect("day one is capped");
    assert_eq!(cap, 20);
    let mut tasks = Vec::new();
    for i in 0..40 {
        let pod = pods[i % 3].clone();
        tasks.push(tokio::spawn(async move {
            pod.warmup_take("new", "prov", 20).await.expect("take")
        }));
    }
    let mut allowed = 0;
    for t in tasks {
        if t.await.expect("task") {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 20);
    assert_eq!(pods[1].warmup_sent("new", "prov").await.expect("sent"), 20);
    // After the schedule the source is warm: no cap.
    assert_eq!(pods[1].warmup_cap("new", &[]).await.expect("cap"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_rates_recover_and_reputation_is_shared() {
    use herald_delivery::shaping::Verdict;
    let server = start_nats();
    let pods = pods(&server, 2).await;
    // An unlimited site is unlimited until a rule cuts it.
    let (wait, factor) = pods[0]
        .take_rate("src", "site", None, 10.0)
        .await
        .expect("rate");
    assert_eq!((wait, factor), (None, 1.0));
    assert_eq!(pods[1].cut_rate("src", "site").await.expect("cut"), 0.5);
    // Both mirrors follow the cut within milliseconds; each read below takes a grant.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, factor) = pods[0]
        .take_rate("src", "site", None, 10.0)
        .await
        .expect("rate");
    assert_eq!(factor, 0.5);
    // Right after a grant at 5/s the next one waits about 200 ms (210: the 5 % margin).
    let (wait, _) = pods[1]
        .take_rate("src", "site", None, 10.0)
        .await
        .expect("rate");
    let wait = wait.expect("rate-limited after the cut");
    assert!(
        wait <= Duration::from_millis(210) && wait >= Duration::from_millis(100),
        "{wait:?}"
    );
    for _ in 0..25 {
        pods[0].recover_rate("src", "site", 0.02).await;
    }
    tokio::time::sleep(Duration::from_millis(250)).await;
    let (_, factor) = pods[1]
        .take_rate("src", "site", None, 10.0)
        .await
        .expect("rate");
    assert_eq!(factor, 1.0, "additive recovery back to the full rate");

    for _ in 0..30 {
        pods[0].record("bad", "prov", Verdict::Blocked);
    }
    pods[0].record("bad", "prov", Verdict::Delivered);
    pods[0].flush_reputation().await;
    let rec = pods[1].reputation("bad", "prov").await;
    assert!(rec.samples() > 30.0 && rec.score() < 0.1, "{rec:?}");
}
