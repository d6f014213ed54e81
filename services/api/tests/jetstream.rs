//! The reports read from a real nats-server with JetStream, asked over gRPC (and HTTP where
//! the answer's shape matters): events published the way ingress and delivery publish them,
//! suppressions added the way delivery adds them.

mod common;

use std::sync::Arc;

use common::{TOKEN, authed, grpc, http, serve};
use herald_api::{Reports, proto};
use herald_core::{
    config::Config,
    envelope::{Event, EventKind},
    queue::{self, Queue},
    suppression::Suppression,
    types::QueueId,
};

/// nats-server with JetStream in a temp dir of its own (the e2e harness's), stopped on
/// drop; fields drop in order, the directory last.
struct Server {
    nats: herald_e2e::Nats,
    _scenario: herald_e2e::Scenario,
}

fn start_nats() -> Server {
    let scenario = herald_e2e::Scenario::new("api-jetstream");
    Server {
        nats: herald_e2e::Nats::start(&scenario),
        _scenario: scenario,
    }
}

const ACCOUNT: &str = "default/app";

struct Setup {
    _server: Server,
    queue: Queue,
    suppression: Suppression,
    config: Config,
}

async fn setup() -> Setup {
    let server = start_nats();
    let mut config = Config::default();
    config.nats.url = server.nats.url();
    let client = queue::connect(&config.nats).await.expect("connect");
    let queue = Queue::setup(client, &config.nats).await.expect("streams");
    let suppression = Suppression::setup(queue.jetstream(), 1, config.delivery.suppression_ttl)
        .await
        .expect("bucket");
    Setup {
        _server: server,
        queue,
        suppression,
        config,
    }
}

fn event(kind: EventKind, id: &str, account: &str, rcpts: &[&str]) -> Event {
    let now = herald_api::reports::now_unix();
    Event {
        kind: kind as i32,
        queue_id: id.to_string(),
        account: account.to_string(),
        sender: "sender@example.test".into(),
        recipients: rcpts.iter().map(|r| r.to_string()).collect(),
        at: now,
        message_id: "m1.abc@example.test".into(),
        ..Default::default()
    }
}

/// One message to two recipients: one deferred then delivered, one hard-bounced; around it,
/// another account's message and another message of the same account.
async fn publish_story(s: &Setup) -> String {
    let id = QueueId::generate().to_string();
    let other = QueueId::generate().to_string();
    let q = &s.queue;
    q.publish_event(event(
        EventKind::Received,
        &other,
        "default/other",
        &["x@example.test"],
    ))
    .await;
    q.publish_event(event(
        EventKind::Received,
        &id,
        ACCOUNT,
        &["user@example.test", "reject@example.test"],
    ))
    .await;
    let mut deferred = event(EventKind::Deferred, &id, ACCOUNT, &["user@example.test"]);
    deferred.reply_text = "451 4.3.0 try later".into();
    q.publish_event(deferred).await;
    let mut bounced = event(EventKind::Bounced, &id, ACCOUNT, &["reject@example.test"]);
    bounced.reply_text = "550 5.1.1 no such user".into();
    bounced.bounce_class = "hard".into();
    q.publish_event(bounced).await;
    s.suppression
        .add(ACCOUNT, "reject@example.test", "550 5.1.1 no such user")
        .await
        .expect("suppressed");
    q.publish_event(event(
        EventKind::Delivered,
        &other,
        "default/other",
        &["x@example.test"],
    ))
    .await;
    let mut delivered = event(EventKind::Delivered, &id, ACCOUNT, &["user@example.test"]);
    delivered.reply_text = "250 2.0.0 Ok".into();
    q.publish_event(delivered).await;
    let mut later = event(
        EventKind::Received,
        &QueueId::generate().to_string(),
        ACCOUNT,
        &["user@example.test"],
    );
    later.message_id = "m2@example.test".into();
    q.publish_event(later).await;
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_history_lists_its_events_in_order() {
    let s = setup().await;
    let id = publish_story(&s).await;
    let reports = Reports::new(&s.queue, &s.config).await.expect("reports");
    let api = serve(Arc::new(reports), Some(TOKEN)).await;
    let mut client = grpc(api.grpc).await;
    for lookup in [id.clone(), "<m1.abc@example.test>".to_string()] {
        let m = client
            .get_message(authed(
                proto::GetMessageRequest {
                    queue_id: lookup.clone(),
                },
                TOKEN,
            ))
            .await
            .unwrap_or_else(|e| panic!("{lookup}: {e}"))
            .into_inner();
        assert_eq!(m.queue_id, id);
        let kinds: Vec<EventKind> = m.events.iter().map(Event::kind).collect();
        assert_eq!(
            kinds,
            [
                EventKind::Received,
                EventKind::Deferred,
                EventKind::Bounced,
                EventKind::Delivered
            ],
            "{lookup}"
        );
        assert!(m.events.iter().all(|e| e.queue_id == id));
        let states: Vec<(&str, EventKind, &str)> = m
            .recipients
            .iter()
            .map(|r| (r.address.as_str(), r.state(), r.reply.as_str()))
            .collect();
        assert_eq!(
            states,
            [
                ("user@example.test", EventKind::Delivered, "250 2.0.0 Ok"),
                (
                    "reject@example.test",
                    EventKind::Bounced,
                    "550 5.1.1 no such user"
                )
            ]
        );
        assert!(m.complete);
    }
    let err = client
        .get_message(authed(
            proto::GetMessageRequest {
                queue_id: QueueId::generate().to_string(),
            },
            TOKEN,
        ))
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), tonic::Code::NotFound);
    let (status, body) = http(api.http, "GET", &format!("/v1/messages/{id}"), Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["events"][2]["kind"], "bounced");
    assert_eq!(body["events"][2]["bounce_class"], "hard");
    assert_eq!(body["recipients"][1]["state"], "bounced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_cut_short_by_max_scan_says_it_is_incomplete() {
    let s = setup().await;
    let id = publish_story(&s).await;
    let mut config = s.config.clone();
    config.api.max_scan = 2;
    let reports = Reports::new(&s.queue, &config).await.expect("reports");
    let api = serve(Arc::new(reports), Some(TOKEN)).await;
    let (status, body) = http(api.http, "GET", &format!("/v1/messages/{id}"), Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["complete"], false, "{body}");
    assert_eq!(body["events"][0]["kind"], "received");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_stats_count_only_that_accounts_events() {
    let s = setup().await;
    publish_story(&s).await;
    let reports = Reports::new(&s.queue, &s.config).await.expect("reports");
    let api = serve(Arc::new(reports), Some(TOKEN)).await;
    let mut client = grpc(api.grpc).await;
    let stats = client
        .account_stats(authed(
            proto::AccountStatsRequest {
                account: ACCOUNT.into(),
                since_unix: 0,
            },
            TOKEN,
        ))
        .await
        .expect("stats")
        .into_inner();
    assert_eq!(
        (
            stats.received,
            stats.delivered,
            stats.deferred,
            stats.bounced,
            stats.suppressed,
            stats.expired
        ),
        (2, 1, 1, 1, 0, 0)
    );
    assert_eq!(stats.bounced_by_class.get("hard"), Some(&1));
    assert!(stats.complete);
    // A window that starts after everything counts nothing.
    let later = client
        .account_stats(authed(
            proto::AccountStatsRequest {
                account: ACCOUNT.into(),
                since_unix: herald_api::reports::now_unix() + 3600,
            },
            TOKEN,
        ))
        .await
        .expect("stats")
        .into_inner();
    assert_eq!((later.received, later.bounced), (0, 0));
    let (status, body) = http(
        api.http,
        "GET",
        "/v1/accounts/default/other/stats",
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["received"].as_u64(), body["delivered"].as_u64()),
        (Some(1), Some(1))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_suppression_lets_the_address_receive_mail_again() {
    let s = setup().await;
    publish_story(&s).await;
    s.suppression
        .add("default/other", "reject@example.test", "550 5.1.1 gone")
        .await
        .expect("other account");
    let reports = Reports::new(&s.queue, &s.config).await.expect("reports");
    let api = serve(Arc::new(reports), Some(TOKEN)).await;
    let mut client = grpc(api.grpc).await;
    let list = |account: &str| {
        authed(
            proto::ListSuppressionsRequest {
                account: account.into(),
            },
            TOKEN,
        )
    };
    let listed = client
        .list_suppressions(list(ACCOUNT))
        .await
        .expect("list")
        .into_inner();
    let addresses: Vec<&str> = listed
        .suppressions
        .iter()
        .map(|s| s.address.as_str())
        .collect();
    assert_eq!(addresses, ["reject@example.test"]);
    assert_eq!(listed.suppressions[0].reason, "550 5.1.1 no such user");
    assert!(listed.suppressions[0].at > 0);
    client
        .delete_suppression(authed(
            proto::DeleteSuppressionRequest {
                account: ACCOUNT.into(),
                address: "Reject@Example.test".into(),
            },
            TOKEN,
        ))
        .await
        .expect("deleted");
    let listed = client
        .list_suppressions(list(ACCOUNT))
        .await
        .expect("list")
        .into_inner();
    assert!(listed.suppressions.is_empty(), "{listed:?}");
    // What ingress and delivery ask now says "not suppressed"; the other account keeps its own.
    assert_eq!(
        s.suppression
            .reason(ACCOUNT, "reject@example.test")
            .await
            .expect("kv"),
        None
    );
    let other = client
        .list_suppressions(list("default/other"))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(other.suppressions.len(), 1);
    let (status, body) = http(
        api.http,
        "DELETE",
        "/v1/accounts/default/app/suppressions/reject@example.test",
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 404, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_status_counts_streams_and_the_delivery_lag() {
    let s = setup().await;
    publish_story(&s).await;
    let reports = Reports::new(&s.queue, &s.config).await.expect("reports");
    let api = serve(Arc::new(reports), Some(TOKEN)).await;
    let mut client = grpc(api.grpc).await;
    let status = client
        .queue_status(authed(proto::QueueStatusRequest {}, TOKEN))
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.events.expect("events").messages, 7);
    assert_eq!(status.queue.expect("queue").messages, 0);
    assert!(status.delivery.is_none(), "no delivery worker yet");

    // A worker's consumer and one entry waiting for it: a lag of one.
    let js = s.queue.jetstream();
    js.get_stream(queue::QUEUE_STREAM)
        .await
        .expect("queue stream")
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some(herald_api::status::DELIVERY_CONSUMER.into()),
            ..Default::default()
        })
        .await
        .expect("consumer");
    s.queue
        .publish_entry(
            &herald_core::envelope::QueueEntry {
                id: QueueId::generate().to_string(),
                account: ACCOUNT.into(),
                domain: "example.test".into(),
                ..Default::default()
            },
            None,
        )
        .await
        .expect("entry");
    let (code, body) = http(api.http, "GET", "/v1/queue", Some(TOKEN)).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["queue"]["messages"], 1, "{body}");
    assert_eq!(body["delivery"]["pending"], 1, "{body}");
    assert_eq!(body["delivery"]["ack_pending"], 0, "{body}");
}
