//! `herald api` against the World: one message delivered and one hard-bounced by the real
//! relay path, then asked about over HTTP exactly as an operator would (curl-like requests
//! with a bearer token): the message's events, the account's counts, the suppression list,
//! and a delete after which ingress accepts the address again.
//!
//! gRPC is not exercised here (this crate stays free of Herald and gRPC crates, and the
//! machine has no grpcurl): services/api/tests/binary.rs asks the `herald api` binary over
//! gRPC, and services/api/tests/jetstream.rs asks every question over gRPC against a real
//! nats-server.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use herald_e2e::{
    Herald, HeraldConfig, Role, Scenario, WORLD_ACCOUNT, World, require_netns, wait_until,
};
use serde_json::Value;

const TOKEN: &str = "e2e-api-token-7f3a";

/// One request with `Connection: close`: (status, JSON body).
fn request(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Accept: application/json\r\nConnection: close\r\n\r\n"
    )
    .expect("write request");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read response");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("incomplete response to {method} {path}: {text}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {head}"));
    let json = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("{method} {path}: body is not JSON ({e}): {body}"));
    (status, json)
}

fn queued_id(text: &str) -> String {
    text.split("queued as ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_string)
        .unwrap_or_else(|| panic!("not queued:\n{text}"))
}

/// The message's history once `address` has reached `state`.
fn wait_state(api: SocketAddr, id: &str, address: &str, state: &str, logs: &str) -> Value {
    let mut last = Value::Null;
    let found = wait_until(Duration::from_secs(40), Duration::from_millis(250), || {
        let (status, body) = request(api, "GET", &format!("/v1/messages/{id}"), Some(TOKEN));
        let reached = status == 200
            && body["recipients"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|r| r["address"] == address && r["state"] == state);
        last = body.clone();
        reached.then_some(body)
    });
    found.unwrap_or_else(|| panic!("{address} of {id} never {state}: {last}\n{logs}"))
}

fn kinds(history: &Value) -> Vec<String> {
    history["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["kind"].as_str().map(String::from))
        .collect()
}

#[test]
fn api_reports_a_delivered_and_a_bounced_message_and_reopens_a_suppressed_address() {
    require_netns();
    let world = World::start("api", &[]);
    let delivered_id = world.submit("api-delivered-marker");
    world.wait_arrival("api-delivered-marker", Duration::from_secs(30));
    let out = world
        .app()
        .from("sender@example.test")
        .to("reject@example.test")
        .header("Subject: api-bounce-marker")
        .run();
    let bounced_id = queued_id(&out.text());

    let http = SocketAddr::from((world.scenario.ip(), world.scenario.port()));
    let grpc = SocketAddr::from((world.scenario.ip(), world.scenario.port()));
    let api = Herald::start_with_env(
        &world.scenario,
        "api",
        Role::Api,
        &world.config,
        Some(http),
        &[
            ("HERALD_API__HTTP_ADDR".into(), http.to_string()),
            ("HERALD_API__GRPC_ADDR".into(), grpc.to_string()),
            ("HERALD_API__TOKEN".into(), TOKEN.into()),
        ],
    );
    let logs = || format!("{}\n--- api:\n{}", world.logs(), api.log_tail());

    // Without the token, or with another one, nothing is answered.
    for token in [None, Some("not-the-token")] {
        for (method, path) in [
            ("GET", format!("/v1/messages/{delivered_id}")),
            ("GET", "/v1/queue".to_string()),
            (
                "DELETE",
                "/v1/accounts/default/app/suppressions/reject@example.test".to_string(),
            ),
        ] {
            let (status, body) = request(http, method, &path, token);
            assert_eq!(status, 401, "{method} {path} with {token:?}: {body}");
            assert_eq!(body["error"], "unauthenticated");
        }
    }

    // The delivered message: received, then delivered by the MX with its 250.
    let history = wait_state(
        http,
        &delivered_id,
        "user@example.test",
        "delivered",
        &logs(),
    );
    assert_eq!(history["queue_id"], delivered_id.as_str());
    assert_eq!(kinds(&history), ["received", "delivered"], "{history}");
    let delivered = &history["events"][1];
    assert_eq!(delivered["reply_code"], 250, "{history}");
    assert_eq!(delivered["account"], format!("default/{WORLD_ACCOUNT}"));
    assert!(
        delivered["remote_host"]
            .as_str()
            .is_some_and(|h| !h.is_empty()),
        "{history}"
    );
    assert_eq!(history["complete"], true);

    // The same message found by its Message-ID header.
    let message_id = history["events"][0]["message_id"]
        .as_str()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| panic!("no Message-ID in the received event: {history}"))
        .trim_matches(['<', '>'])
        .to_string();
    let (status, by_message_id) = request(
        http,
        "GET",
        &format!("/v1/messages/%3C{message_id}%3E"),
        Some(TOKEN),
    );
    assert_eq!(status, 200, "{by_message_id}");
    assert_eq!(by_message_id["queue_id"], delivered_id.as_str());

    // The bounced one: received, then a hard bounce with the MX's 5.1.1.
    let history = wait_state(http, &bounced_id, "reject@example.test", "bounced", &logs());
    assert_eq!(kinds(&history), ["received", "bounced"], "{history}");
    let bounce = &history["events"][1];
    assert_eq!(bounce["bounce_class"], "hard", "{history}");
    assert_eq!(bounce["enhanced_code"], "5.1.1", "{history}");
    assert_eq!(bounce["reply_code"], 550, "{history}");

    // The account's counts over the last day.
    let (status, stats) = request(http, "GET", "/v1/accounts/default/app/stats", Some(TOKEN));
    assert_eq!(status, 200, "{stats}");
    assert_eq!(stats["account"], "default/app");
    assert_eq!(stats["received"], 2, "{stats}");
    assert_eq!(stats["bounced"], 1, "{stats}");
    assert_eq!(stats["bounced_by_class"]["hard"], 1, "{stats}");
    // The message, and the bounce delivered to the sender's mailbox at the same MX.
    assert!(
        stats["delivered"].as_u64().unwrap_or_default() >= 1,
        "{stats}"
    );
    assert_eq!(stats["deferred"], 0, "{stats}");
    let (_, later) = request(
        http,
        "GET",
        &format!(
            "/v1/accounts/default/app/stats?since={}",
            herald_e2e::unix_now() as i64 + 3600
        ),
        Some(TOKEN),
    );
    assert_eq!(later["received"], 0, "{later}");

    // The bounced address is suppressed, and ingress refuses it.
    let suppressions = "/v1/accounts/default/app/suppressions";
    let listed = wait_until(Duration::from_secs(20), Duration::from_millis(250), || {
        let (status, body) = request(http, "GET", suppressions, Some(TOKEN));
        (status == 200
            && body["suppressions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|s| s["address"] == "reject@example.test"))
        .then_some(body)
    })
    .unwrap_or_else(|| panic!("reject@example.test never listed\n{}", logs()));
    let entry = listed["suppressions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["address"] == "reject@example.test")
        .expect("listed");
    assert!(
        entry["reason"]
            .as_str()
            .is_some_and(|r| r.contains("5.1.1")),
        "{listed}"
    );
    let refused = world
        .app()
        .from("sender@example.test")
        .to("reject@example.test")
        .run();
    assert!(
        refused.contains("550 5.1.1 Recipient <reject@example.test> is on the suppression list"),
        "{}",
        refused.text()
    );

    // Deleting it lets mail to the (fixed) address in again.
    let delete = format!("{suppressions}/reject@example.test");
    let (status, body) = request(http, "DELETE", &delete, Some(TOKEN));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deleted"], true);
    let (status, body) = request(http, "GET", suppressions, Some(TOKEN));
    assert_eq!(status, 200, "{body}");
    assert!(
        !body["suppressions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| s["address"] == "reject@example.test"),
        "{body}"
    );
    let (status, body) = request(http, "DELETE", &delete, Some(TOKEN));
    assert_eq!(status, 404, "deleting twice: {body}");
    let accepted = world
        .app()
        .from("sender@example.test")
        .to("reject@example.test")
        .header("Subject: api-after-delete")
        .run();
    assert!(
        accepted.contains("250 2.0.0 Ok: queued as"),
        "after the delete ingress accepts the address again:\n{}",
        accepted.text()
    );

    // Errors name themselves.
    let (status, body) = request(
        http,
        "GET",
        "/v1/messages/01J8ZX3M4N5P6Q7R8S9T0V1W2X",
        Some(TOKEN),
    );
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("not_found")),
        "{body}"
    );
    let (status, body) = request(http, "GET", "/v1/messages/not-a-queue-id", Some(TOKEN));
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("bad_request")),
        "{body}"
    );
    let (status, body) = request(
        http,
        "GET",
        "/v1/accounts/default/app/stats?since=last-week",
        Some(TOKEN),
    );
    assert_eq!(status, 400, "{body}");

    // And the queue.
    let (status, queue) = request(http, "GET", "/v1/queue", Some(TOKEN));
    assert_eq!(status, 200, "{queue}");
    assert_eq!(queue["events"]["name"], "HERALD_EVENTS");
    assert!(
        queue["events"]["messages"].as_u64().unwrap_or_default() >= 4,
        "{queue}"
    );
    assert_eq!(queue["delivery"]["name"], "delivery", "{queue}");
}

#[test]
fn api_without_a_token_refuses_to_listen_beyond_loopback() {
    let scenario = Scenario::new("api-no-token");
    // The token policy is checked before NATS is dialled: no server needed.
    let config = HeraldConfig::new("nats://127.0.0.1:9", &scenario.subdir("resources"))
        .write(&scenario.dir().join("herald.yaml"));
    // 0.0.0.0 is every address, not loopback: without a token `herald api` must not start.
    let mut api = Herald::spawn_with_env(
        &scenario,
        "api",
        Role::Api,
        &config,
        None,
        &[(
            "HERALD_API__HTTP_ADDR".into(),
            format!("0.0.0.0:{}", scenario.port()),
        )],
    );
    let exited = wait_until(Duration::from_secs(20), Duration::from_millis(100), || {
        (!api.is_running()).then_some(())
    });
    assert!(exited.is_some(), "herald api kept running:\n{}", api.log());
    assert!(
        api.last_status().is_some_and(|s| !s.success()),
        "{:?}",
        api.last_status()
    );
    assert!(api.log().contains("api.token"), "{}", api.log());
}
