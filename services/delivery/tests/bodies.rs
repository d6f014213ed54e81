//! Where a message's body lives, against a real nats-server: inside the entry of a message
//! with one destination domain, in the body stream when several entries share it, in the
//! object store above the max payload; read back byte for byte and removed when finished.

use bytes::Bytes;
use herald_core::{
    config::NatsConfig,
    envelope::{QueueEntry, body_ref::Location},
    queue::{BODY_STREAM, Queue, body_subject},
};

fn entry(id: &str, sole_domain: bool) -> QueueEntry {
    QueueEntry {
        id: id.into(),
        account: "default/app".into(),
        sender: "a@example.test".into(),
        domain: "rcpt.test".into(),
        sole_domain,
        ..Default::default()
    }
}

fn body(len: usize) -> Bytes {
    (0..len).map(|i| b"abcdefghij\r\n"[i % 12]).collect()
}

async fn stored_bodies(js: &async_nats::jetstream::Context) -> u64 {
    js.get_stream(BODY_STREAM)
        .await
        .expect("stream")
        .info()
        .await
        .expect("info")
        .state
        .messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_go_inline_to_the_stream_or_to_the_object_store() {
    herald_e2e::require_netns();
    let scenario = herald_e2e::Scenario::new("bodies");
    let nats = herald_e2e::Nats::start(&scenario);
    let client = herald_core::queue::connect(&NatsConfig {
        url: nats.url(),
        ..Default::default()
    })
    .await
    .expect("connect");
    let queue = Queue::setup(
        client.clone(),
        &NatsConfig {
            url: nats.url(),
            ..Default::default()
        },
    )
    .await
    .expect("setup");
    let js = async_nats::jetstream::new(client);

    // One destination domain, 100 KiB: carried by the entry, nothing in the body stream.
    let mut sole = entry("01INLINE", true);
    let small = body(100 * 1024);
    let r = queue
        .place_body(&sole, small.clone(), "digest".into())
        .await
        .expect("place");
    assert!(matches!(r.location, Some(Location::Inline(_))), "{r:?}");
    assert_eq!((r.size, r.sha256.as_str()), (small.len() as u64, "digest"));
    sole.body = Some(r.clone());
    assert_eq!(queue.load_body(&r).await.expect("load"), small);
    assert_eq!(stored_bodies(&js).await, 0);
    queue.finish_domain(&sole).await.expect("finish");

    // Several entries share one stored body; the pending record removes it after the last.
    let mut first = entry("01SHARED", false);
    let r = queue
        .place_body(&first, small.clone(), String::new())
        .await
        .expect("place");
    assert_eq!(
        r.location,
        Some(Location::StreamSubject(body_subject("01SHARED")))
    );
    assert_eq!(stored_bodies(&js).await, 1);
    queue
        .track_pending("01SHARED", &["rcpt.test".into(), "other.test".into()])
        .await
        .expect("pending");
    first.body = Some(r.clone());
    let second = QueueEntry {
        domain: "other.test".into(),
        ..first.clone()
    };
    assert_eq!(queue.load_body(&r).await.expect("load"), small);
    queue.finish_domain(&first).await.expect("finish");
    assert_eq!(
        stored_bodies(&js).await,
        1,
        "the other domain still needs it"
    );
    queue.finish_domain(&second).await.expect("finish");
    assert_eq!(stored_bodies(&js).await, 0);

    // Above the max payload (1 MiB): the object store, even for a sole domain.
    let mut large_entry = entry("01LARGE", true);
    let large = body(3 * 1024 * 1024 / 2);
    let r = queue
        .place_body(&large_entry, large.clone(), String::new())
        .await
        .expect("place");
    assert_eq!(r.location, Some(Location::Object("01LARGE".into())));
    assert_eq!(queue.load_body(&r).await.expect("load"), large);
    large_entry.body = Some(r.clone());
    queue.finish_domain(&large_entry).await.expect("finish");
    let gone = queue.load_body(&r).await;
    assert!(
        matches!(gone, Err(herald_core::Error::BodyMissing(_))),
        "{gone:?}"
    );

    // A body cut short in the store is refused, not delivered.
    let mut wrong = queue
        .place_body(&entry("01SHORT", false), small.clone(), String::new())
        .await
        .expect("place");
    wrong.size += 1;
    let refused = queue.load_body(&wrong).await;
    assert!(
        matches!(refused, Err(herald_core::Error::Envelope(_))),
        "{refused:?}"
    );
}
