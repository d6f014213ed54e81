//! `herald api`, the binary an operator runs, asked over gRPC: configured by its YAML file
//! and `HERALD_API__*` variables, reading events that the queue published into a real
//! nats-server, refusing calls without the bearer token. (tests/jetstream.rs covers the
//! answers in depth through `herald_api::serve`; this checks the binary wires it all up.)

mod common;

use std::net::SocketAddr;

use common::{TOKEN, authed};
use herald_api::proto;
use herald_core::{
    config::NatsConfig,
    envelope::{Event, EventKind},
    queue::{self, Queue},
    types::QueueId,
};
use herald_e2e::{Herald, HeraldConfig, Nats, Role, Scenario, require_netns};

fn event(kind: EventKind, id: &str, recipient: &str) -> Event {
    Event {
        kind: kind as i32,
        queue_id: id.to_string(),
        account: "default/app".into(),
        sender: "sender@example.test".into(),
        recipients: vec![recipient.to_string()],
        at: herald_api::reports::now_unix(),
        message_id: "bin.1@example.test".into(),
        reply_code: if kind == EventKind::Delivered { 250 } else { 0 },
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_binary_answers_over_grpc_with_its_token_only() {
    require_netns();
    let scenario = Scenario::new("api-binary");
    let nats = Nats::start(&scenario);
    let nats_config = NatsConfig {
        url: nats.url(),
        ..Default::default()
    };
    let queue = Queue::setup(
        queue::connect(&nats_config).await.expect("connect"),
        &nats_config,
    )
    .await
    .expect("streams");
    let id = QueueId::generate().to_string();
    for kind in [EventKind::Received, EventKind::Delivered] {
        queue
            .publish_event(event(kind, &id, "user@example.test"))
            .await;
    }

    let resources = scenario.dir().join("resources");
    std::fs::create_dir_all(&resources).expect("resources dir");
    let config = HeraldConfig::new(&nats.url(), &resources).write(&scenario.dir().join("api.yaml"));
    let http = SocketAddr::from((scenario.ip(), scenario.port()));
    let grpc = SocketAddr::from((scenario.ip(), scenario.port()));
    let api = Herald::start_with_env(
        &scenario,
        "api",
        Role::Api,
        &config,
        Some(http),
        &[
            ("HERALD_API__HTTP_ADDR".into(), http.to_string()),
            ("HERALD_API__GRPC_ADDR".into(), grpc.to_string()),
            ("HERALD_API__TOKEN".into(), TOKEN.into()),
        ],
    );

    let mut client = None;
    for _ in 0..50 {
        match proto::reports_client::ReportsClient::connect(format!("http://{grpc}")).await {
            Ok(c) => {
                client = Some(c);
                break;
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
    let mut client =
        client.unwrap_or_else(|| panic!("no gRPC listener on {grpc}\n{}", api.log_tail()));

    let request = || proto::GetMessageRequest {
        queue_id: id.clone(),
    };
    let refused = client
        .get_message(tonic::Request::new(request()))
        .await
        .expect_err("no token");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused}");
    let refused = client
        .get_message(authed(request(), "not-the-token"))
        .await
        .expect_err("wrong token");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused}");

    let message = client
        .get_message(authed(request(), TOKEN))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", api.log_tail()))
        .into_inner();
    assert_eq!(message.queue_id, id);
    let kinds: Vec<EventKind> = message.events.iter().map(Event::kind).collect();
    assert_eq!(kinds, [EventKind::Received, EventKind::Delivered]);
    let states: Vec<(&str, EventKind)> = message
        .recipients
        .iter()
        .map(|r| (r.address.as_str(), r.state()))
        .collect();
    assert_eq!(states, [("user@example.test", EventKind::Delivered)]);

    let status = client
        .queue_status(authed(proto::QueueStatusRequest {}, TOKEN))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", api.log_tail()))
        .into_inner();
    let events = status.events.as_ref().expect("events stream status");
    assert_eq!(events.messages, 2, "{status:?}");
}
