//! The handlers of both front-ends against an in-memory backend: the token is required
//! everywhere, bad input is refused before the backend is asked, and each answer has its
//! status (HTTP) or code (gRPC).

mod common;

use std::sync::{Arc, Mutex};

use common::{TOKEN, authed, grpc, http, serve};
use herald_api::{
    AccountId, ApiError, Backend, QueueStatus, StreamStatus, SuppressionList,
    history::{Lookup, MessageHistory, RecipientState},
    proto,
    stats::AccountStats,
};
use herald_core::{
    envelope::{Event, EventKind},
    suppression::Suppressed,
    types::Mailbox,
};

const QUEUE_ID: &str = "01J8ZX3M4N5P6Q7R8S9T0V1W2X";

/// Answers from memory and records what it was asked.
#[derive(Default)]
struct Memory {
    calls: Mutex<Vec<String>>,
    suppressed: Mutex<Vec<String>>,
}

impl Memory {
    fn called(&self, what: String) {
        self.calls.lock().expect("lock").push(what);
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().expect("lock").clone()
    }
}

fn stream(name: &str, messages: u64) -> StreamStatus {
    StreamStatus {
        name: name.into(),
        messages,
        bytes: 0,
        consumers: 0,
    }
}

impl Backend for Memory {
    async fn message(&self, lookup: &Lookup) -> Result<MessageHistory, ApiError> {
        self.called(format!("message {lookup:?}"));
        match lookup {
            Lookup::Queue { id, .. } if id == QUEUE_ID => Ok(MessageHistory {
                queue_id: id.clone(),
                events: vec![
                    Event {
                        kind: EventKind::Received as i32,
                        queue_id: id.clone(),
                        recipients: vec!["a@example.test".into()],
                        at: 1,
                        ..Default::default()
                    },
                    Event {
                        kind: EventKind::Delivered as i32,
                        queue_id: id.clone(),
                        recipients: vec!["a@example.test".into()],
                        reply_text: "250 2.0.0 Ok".into(),
                        at: 2,
                        ..Default::default()
                    },
                ],
                recipients: vec![RecipientState {
                    address: "a@example.test".into(),
                    state: EventKind::Delivered,
                    at: 2,
                    reply: "250 2.0.0 Ok".into(),
                    bounce_class: String::new(),
                }],
                complete: true,
            }),
            _ => Err(ApiError::NotFound("no such message".into())),
        }
    }

    async fn account_stats(
        &self,
        account: &AccountId,
        since: i64,
    ) -> Result<AccountStats, ApiError> {
        self.called(format!("stats {account} {since}"));
        Ok(AccountStats {
            account: account.to_string(),
            since,
            received: 2,
            delivered: 1,
            bounced: 1,
            bounced_by_class: [("hard".to_string(), 1)].into(),
            complete: true,
            ..Default::default()
        })
    }

    async fn suppressions(&self, account: &AccountId) -> Result<SuppressionList, ApiError> {
        self.called(format!("suppressions {account}"));
        Ok(SuppressionList {
            account: account.to_string(),
            suppressions: self
                .suppressed
                .lock()
                .expect("lock")
                .iter()
                .map(|a| Suppressed {
                    address: a.clone(),
                    reason: "550 5.1.1 no such user".into(),
                    at: 3,
                })
                .collect(),
            complete: true,
        })
    }

    async fn delete_suppression(
        &self,
        account: &AccountId,
        address: &Mailbox,
    ) -> Result<(), ApiError> {
        self.called(format!("delete {account} {address}"));
        let mut list = self.suppressed.lock().expect("lock");
        let before = list.len();
        list.retain(|a| !a.eq_ignore_ascii_case(&address.to_string()));
        if list.len() == before {
            return Err(ApiError::NotFound(format!("{address} is not suppressed")));
        }
        Ok(())
    }

    async fn queue_status(&self) -> Result<QueueStatus, ApiError> {
        self.called("queue".into());
        Ok(QueueStatus {
            queue: stream("HERALD_QUEUE", 4),
            bodies: stream("HERALD_BODIES", 3),
            events: stream("HERALD_EVENTS", 9),
            delivery: None,
        })
    }
}

fn memory() -> Arc<Memory> {
    let m = Memory::default();
    m.suppressed
        .lock()
        .expect("lock")
        .push("reject@example.test".into());
    Arc::new(m)
}

#[tokio::test]
async fn every_http_endpoint_needs_the_token() {
    let backend = memory();
    let api = serve(backend.clone(), Some(TOKEN)).await;
    for (method, path) in [
        ("GET", format!("/v1/messages/{QUEUE_ID}")),
        ("GET", "/v1/accounts/default/app/stats".into()),
        ("GET", "/v1/accounts/default/app/suppressions".into()),
        (
            "DELETE",
            "/v1/accounts/default/app/suppressions/reject@example.test".into(),
        ),
        ("GET", "/v1/queue".into()),
        ("GET", "/v1/nothing-here".into()),
    ] {
        for token in [None, Some("wrong")] {
            let (status, body) = http(api.http, method, &path, token).await;
            assert_eq!(status, 401, "{method} {path} with {token:?}: {body}");
            assert_eq!(body["error"], "unauthenticated");
        }
    }
    assert!(backend.calls().is_empty(), "{:?}", backend.calls());
    let (status, body) = http(api.http, "GET", "/v1/queue", Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["queue"]["messages"], 4);
    assert!(body["delivery"].is_null());
}

#[tokio::test]
async fn http_answers_the_message_history_and_404_for_an_unknown_one() {
    let api = serve(memory(), Some(TOKEN)).await;
    let (status, body) = http(
        api.http,
        "GET",
        &format!("/v1/messages/{QUEUE_ID}"),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["queue_id"], QUEUE_ID);
    let kinds: Vec<&str> = body["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert_eq!(kinds, ["received", "delivered"]);
    assert_eq!(body["recipients"][0]["state"], "delivered");
    assert_eq!(body["recipients"][0]["reply"], "250 2.0.0 Ok");

    let other = "01J8ZX3M4N5P6Q7R8S9T0V1W2Y";
    let (status, body) = http(
        api.http,
        "GET",
        &format!("/v1/messages/{other}"),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"], "not_found");
    // A Message-ID is a lookup too.
    let (status, _) = http(
        api.http,
        "GET",
        "/v1/messages/%3Cabc@example.test%3E",
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn bad_input_is_400_and_never_reaches_the_backend() {
    let backend = memory();
    let api = serve(backend.clone(), Some(TOKEN)).await;
    for path in [
        "/v1/messages/not-an-id",
        "/v1/accounts/default/app/stats?since=yesterday",
        "/v1/accounts/default/app/stats?since=-5",
        "/v1/accounts/default/a%20b/suppressions",
        "/v1/accounts/default/%2A/stats",
    ] {
        let (status, body) = http(api.http, "GET", path, Some(TOKEN)).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"], "bad_request");
    }
    let (status, body) = http(
        api.http,
        "DELETE",
        "/v1/accounts/default/app/suppressions/not-an-address",
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(backend.calls().is_empty(), "{:?}", backend.calls());
}

#[tokio::test]
async fn http_stats_default_to_the_last_day_and_take_since() {
    let backend = memory();
    let api = serve(backend.clone(), Some(TOKEN)).await;
    let (status, body) = http(
        api.http,
        "GET",
        "/v1/accounts/default/app/stats?since=1700000000",
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["account"], "default/app");
    assert_eq!(body["since"], 1_700_000_000);
    assert_eq!(body["bounced_by_class"]["hard"], 1);
    let (status, body) = http(
        api.http,
        "GET",
        "/v1/accounts/default/app/stats",
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let since = body["since"].as_i64().expect("since");
    let now = herald_api::reports::now_unix();
    assert!((now - 86_400 - since).abs() < 60, "{since} vs {now}");
}

#[tokio::test]
async fn http_delete_takes_an_address_off_once() {
    let api = serve(memory(), Some(TOKEN)).await;
    let list = "/v1/accounts/default/app/suppressions";
    let (status, body) = http(api.http, "GET", list, Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["suppressions"][0]["address"], "reject@example.test");
    let delete = format!("{list}/Reject@Example.test");
    let (status, body) = http(api.http, "DELETE", &delete, Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deleted"], true);
    assert_eq!(body["address"], "Reject@example.test");
    let (status, body) = http(api.http, "DELETE", &delete, Some(TOKEN)).await;
    assert_eq!(status, 404, "{body}");
    let (_, body) = http(api.http, "GET", list, Some(TOKEN)).await;
    assert_eq!(body["suppressions"], serde_json::json!([]));
}

#[tokio::test]
async fn without_a_configured_token_no_header_is_needed() {
    let api = serve(memory(), None).await;
    let (status, _) = http(api.http, "GET", "/v1/queue", None).await;
    assert_eq!(status, 200);
    let mut client = grpc(api.grpc).await;
    client
        .queue_status(proto::QueueStatusRequest {})
        .await
        .expect("no token needed");
}

#[tokio::test]
async fn grpc_needs_the_token_and_maps_errors_to_codes() {
    let backend = memory();
    let api = serve(backend.clone(), Some(TOKEN)).await;
    let mut client = grpc(api.grpc).await;
    let err = client
        .queue_status(proto::QueueStatusRequest {})
        .await
        .expect_err("no token");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let err = client
        .queue_status(authed(proto::QueueStatusRequest {}, "wrong"))
        .await
        .expect_err("wrong token");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(backend.calls().is_empty());

    let m = client
        .get_message(authed(
            proto::GetMessageRequest {
                queue_id: QUEUE_ID.into(),
            },
            TOKEN,
        ))
        .await
        .expect("message")
        .into_inner();
    let kinds: Vec<EventKind> = m.events.iter().map(Event::kind).collect();
    assert_eq!(kinds, [EventKind::Received, EventKind::Delivered]);
    assert_eq!(m.recipients[0].state(), EventKind::Delivered);

    for (queue_id, code) in [
        ("01J8ZX3M4N5P6Q7R8S9T0V1W2Y", tonic::Code::NotFound),
        ("not an id", tonic::Code::InvalidArgument),
    ] {
        let err = client
            .get_message(authed(
                proto::GetMessageRequest {
                    queue_id: queue_id.into(),
                },
                TOKEN,
            ))
            .await
            .expect_err("refused");
        assert_eq!(err.code(), code, "{queue_id}: {err}");
    }
    let err = client
        .account_stats(authed(
            proto::AccountStatsRequest {
                account: "app".into(),
                since_unix: 0,
            },
            TOKEN,
        ))
        .await
        .expect_err("account without namespace");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    let stats = client
        .account_stats(authed(
            proto::AccountStatsRequest {
                account: "default/app".into(),
                since_unix: 1_700_000_000,
            },
            TOKEN,
        ))
        .await
        .expect("stats")
        .into_inner();
    assert_eq!((stats.received, stats.delivered, stats.bounced), (2, 1, 1));
    assert_eq!(stats.bounced_by_class.get("hard"), Some(&1));

    let list = client
        .list_suppressions(authed(
            proto::ListSuppressionsRequest {
                account: "default/app".into(),
            },
            TOKEN,
        ))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(list.suppressions[0].address, "reject@example.test");
    let delete = || {
        authed(
            proto::DeleteSuppressionRequest {
                account: "default/app".into(),
                address: "reject@example.test".into(),
            },
            TOKEN,
        )
    };
    client.delete_suppression(delete()).await.expect("deleted");
    let err = client
        .delete_suppression(delete())
        .await
        .expect_err("already gone");
    assert_eq!(err.code(), tonic::Code::NotFound);
}
