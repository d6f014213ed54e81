//! The Kubernetes resource source against a mock API server (kube-rs `controller-rs` style,
//! as in operator/src/fixtures.rs): a `tower_test` service behind `kube::Client` plays the
//! API server for one namespace. It answers LISTs from its objects and keeps WATCH responses
//! open as streams of JSON lines, so a test changes an object and the source sees one watch
//! event, exactly as against a real cluster. Every request is recorded, and any request the
//! data plane must not make (an unlabelled Secret list, another namespace) is refused with
//! 403 and fails the test.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    future::Future,
    sync::Arc,
    time::Duration,
};

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use bytes::Bytes;
use herald_core::{
    resources::{KubeSource, ResourceSource, SenderDomainRefusal},
    types::Domain,
};
use http::{Request, Response};
use http_body_util::{BodyExt, Channel, Full, channel::Sender, combinators::UnsyncBoxBody};
use kube::Client;
use serde_json::{Value, json};
use tokio::sync::Mutex;

const NS: &str = "mail";
const WAIT: Duration = Duration::from_secs(10);

type Body = UnsyncBoxBody<Bytes, Infallible>;
type Responder = tower_test::mock::SendResponse<Response<Body>>;

/// The four collections the data plane may read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Collection {
    MailDomains,
    SmtpAccounts,
    /// Secrets selected by `herald.dev/maildomain`.
    DkimSecrets,
    /// Secrets selected by `herald.dev/smtpaccount`.
    AccountSecrets,
}

use Collection::*;

impl Collection {
    fn list_kind(self) -> (&'static str, &'static str) {
        match self {
            MailDomains => ("herald.dev/v1alpha1", "MailDomainList"),
            SmtpAccounts => ("herald.dev/v1alpha1", "SmtpAccountList"),
            DkimSecrets | AccountSecrets => ("v1", "SecretList"),
        }
    }
}

#[derive(Default)]
struct Objects {
    by_name: BTreeMap<String, Value>,
    /// Open WATCH responses.
    watches: Vec<Sender<Bytes, Infallible>>,
    /// LIST requests waiting for `release_lists`.
    held: Option<Vec<Responder>>,
    lists: usize,
    watches_started: usize,
}

#[derive(Default)]
struct State {
    resource_version: u64,
    collections: HashMap<Collection, Objects>,
    /// Every request as `path?query`, in order.
    requests: Vec<String>,
    /// Requests the data plane must never make.
    refused: Vec<String>,
}

impl State {
    fn objects(&mut self, c: Collection) -> &mut Objects {
        self.collections.entry(c).or_default()
    }

    fn list(&mut self, c: Collection) -> Value {
        let rv = self.resource_version.to_string();
        let (api_version, kind) = c.list_kind();
        let items: Vec<Value> = self.objects(c).by_name.values().cloned().collect();
        json!({
            "apiVersion": api_version, "kind": kind,
            "metadata": {"resourceVersion": rv},
            "items": items,
        })
    }
}

#[derive(Clone)]
struct ApiServer(Arc<Mutex<State>>);

fn full(code: u16, body: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(body).expect("json");
    Response::builder()
        .status(code)
        .body(Full::new(Bytes::from(bytes)).boxed_unsync())
        .expect("response")
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).expect("hex");
                out.push(u8::from_str_radix(hex, 16).expect("hex"));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).expect("utf8")
}

/// Which collection a request reads, and whether it is a WATCH; `Err` for a request the data
/// plane has no business making.
fn route(uri: &http::Uri) -> Result<(Collection, bool), String> {
    let query: HashMap<String, String> = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        .collect();
    let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let crd = |plural: &str| format!("/apis/herald.dev/v1alpha1/namespaces/{NS}/{plural}");
    let path = uri.path();
    let collection = if path == crd("maildomains") {
        MailDomains
    } else if path == crd("smtpaccounts") {
        SmtpAccounts
    } else if path == format!("/api/v1/namespaces/{NS}/secrets") {
        match query.get("labelSelector").map(String::as_str) {
            Some("herald.dev/maildomain") => DkimSecrets,
            Some("herald.dev/smtpaccount") => AccountSecrets,
            other => return Err(format!("Secrets listed with labelSelector {other:?}")),
        }
    } else {
        return Err(format!("unexpected path {path}"));
    };
    Ok((collection, watch))
}

impl ApiServer {
    /// A client whose every request goes to a new mock API server holding `objects`.
    fn start(objects: Vec<(Collection, Value)>) -> (Client, ApiServer) {
        let mut state = State::default();
        for (c, obj) in objects {
            state.resource_version += 1;
            let mut obj = obj;
            obj["metadata"]["resourceVersion"] = json!(state.resource_version.to_string());
            let name = obj["metadata"]["name"].as_str().expect("name").to_string();
            state.objects(c).by_name.insert(name, obj);
        }
        let server = ApiServer(Arc::new(Mutex::new(state)));
        let (service, mut handle) =
            tower_test::mock::pair::<Request<kube::client::Body>, Response<Body>>();
        let serving = server.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                serving.serve(request.uri().clone(), send).await;
            }
        });
        // The default namespace is not the watched one: the source must use the one given.
        (Client::new(service, "default"), server)
    }

    async fn serve(&self, uri: http::Uri, send: Responder) {
        let mut state = self.0.lock().await;
        state.requests.push(uri.to_string());
        let (c, watch) = match route(&uri) {
            Ok(r) => r,
            Err(why) => {
                state.refused.push(format!("{uri}: {why}"));
                send.send_response(full(403, &status(403, "Forbidden", &why)));
                return;
            }
        };
        if watch {
            let (sender, body) = Channel::<Bytes, Infallible>::new(64);
            let objects = state.objects(c);
            objects.watches.push(sender);
            objects.watches_started += 1;
            send.send_response(
                Response::builder()
                    .status(200)
                    .body(body.boxed_unsync())
                    .expect("response"),
            );
            return;
        }
        state.objects(c).lists += 1;
        if let Some(held) = &mut state.objects(c).held {
            held.push(send);
            return;
        }
        let list = state.list(c);
        send.send_response(full(200, &list));
    }

    /// LISTs of `c` get no answer until [`Self::release_lists`].
    async fn hold_lists(&self, c: Collection) {
        self.0.lock().await.objects(c).held = Some(Vec::new());
    }

    async fn release_lists(&self, c: Collection) {
        let mut state = self.0.lock().await;
        let held = state.objects(c).held.take().unwrap_or_default();
        let list = state.list(c);
        for send in held {
            send.send_response(full(200, &list));
        }
    }

    async fn lists(&self, c: Collection) -> usize {
        self.0.lock().await.objects(c).lists
    }

    async fn watches_started(&self, c: Collection) -> usize {
        self.0.lock().await.objects(c).watches_started
    }

    /// Sends one watch event (`type`, `object`) to every open watch of `c`, once one is open:
    /// an API server replays what a watch missed, this mock waits instead.
    async fn event(&self, c: Collection, type_: &str, object: &Value) {
        eventually("a watch to be open", || async {
            !self.0.lock().await.objects(c).watches.is_empty()
        })
        .await;
        let mut state = self.0.lock().await;
        let mut line = serde_json::to_vec(&json!({"type": type_, "object": object})).expect("json");
        line.push(b'\n');
        let mut open = Vec::new();
        for mut w in std::mem::take(&mut state.objects(c).watches) {
            if w.send_data(Bytes::from(line.clone())).await.is_ok() {
                open.push(w);
            }
        }
        state.objects(c).watches = open;
    }

    /// Creates or replaces an object and sends `ADDED` or `MODIFIED`.
    async fn apply(&self, c: Collection, obj: Value) {
        let (obj, type_) = {
            let mut state = self.0.lock().await;
            state.resource_version += 1;
            let mut obj = obj;
            obj["metadata"]["resourceVersion"] = json!(state.resource_version.to_string());
            let name = obj["metadata"]["name"].as_str().expect("name").to_string();
            let type_ = match state.objects(c).by_name.insert(name, obj.clone()) {
                Some(_) => "MODIFIED",
                None => "ADDED",
            };
            (obj, type_)
        };
        self.event(c, type_, &obj).await;
    }

    /// Deletes an object and sends `DELETED`.
    async fn delete(&self, c: Collection, name: &str) {
        let obj = self.forget(c, name).await;
        self.event(c, "DELETED", &obj).await;
    }

    /// Deletes an object without telling any watch: a deletion that happened while the
    /// watch was down, which only a re-list can reveal.
    async fn forget(&self, c: Collection, name: &str) -> Value {
        let mut state = self.0.lock().await;
        state.resource_version += 1;
        let rv = state.resource_version.to_string();
        let mut obj = state
            .objects(c)
            .by_name
            .remove(name)
            .unwrap_or_else(|| panic!("no {name} in {c:?}"));
        obj["metadata"]["resourceVersion"] = json!(rv);
        obj
    }

    /// Ends every watch of `c` with `410 Gone`: the client must re-list.
    async fn expire_watches(&self, c: Collection) {
        self.event(
            c,
            "ERROR",
            &status(410, "Expired", "too old resource version"),
        )
        .await;
        self.end_watches(c).await;
    }

    /// Closes every watch response of `c`, as the API server does when `timeoutSeconds`
    /// runs out.
    async fn end_watches(&self, c: Collection) {
        self.0.lock().await.objects(c).watches.clear();
    }

    async fn requests(&self) -> Vec<String> {
        self.0.lock().await.requests.clone()
    }

    /// Fails the test if the source made any request it must not make.
    async fn assert_nothing_refused(&self) {
        let refused = self.0.lock().await.refused.clone();
        assert!(refused.is_empty(), "forbidden requests: {refused:?}");
    }
}

/// Waits until `check` holds, failing the test after [`WAIT`].
async fn eventually<F, Fut>(what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn maildomain(ready: bool) -> Value {
    let ready = if ready { "True" } else { "False" };
    json!({
        "apiVersion": "herald.dev/v1alpha1", "kind": "MailDomain",
        "metadata": {"name": "example-test", "namespace": NS, "generation": 1},
        "spec": {"domain": "example.test", "dkim": {"selector": "s1"}, "verification": "Required"},
        "status": {
            "observedGeneration": 1,
            "dkimSecret": "example-test-dkim",
            "conditions": [
                {"type": "DkimKeyReady", "status": "True", "reason": "KeysPresent", "message": ""},
                {"type": "Ready", "status": ready, "reason": "Checked", "message": ""},
            ],
        },
    })
}

fn account(name: &str, networks: &[&str]) -> Value {
    json!({
        "apiVersion": "herald.dev/v1alpha1", "kind": "SmtpAccount",
        "metadata": {"name": name, "namespace": NS, "generation": 1},
        "spec": {
            "passwordSecret": {"name": format!("{name}-smtp"), "key": "password"},
            "allowedDomains": ["example-test"],
            "clientNetworks": networks,
        },
    })
}

fn secret(name: &str, label: (&str, &str), data: &[(&str, &str)]) -> Value {
    let data: BTreeMap<&str, String> = data.iter().map(|(k, v)| (*k, B64.encode(v))).collect();
    json!({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": name, "namespace": NS, "labels": {label.0: label.1}},
        "data": data,
    })
}

fn dkim_secret() -> Value {
    secret(
        "example-test-dkim",
        ("herald.dev/maildomain", "example-test"),
        &[("rsa-sha256.pem", "-----BEGIN PRIVATE KEY-----")],
    )
}

fn password_secret(account: &str, password: &str) -> Value {
    secret(
        &format!("{account}-smtp"),
        ("herald.dev/smtpaccount", account),
        &[("password", password)],
    )
}

/// One unverified MailDomain with its DKIM Secret, and account `app` allowed to use it.
fn cluster() -> Vec<(Collection, Value)> {
    vec![
        (MailDomains, maildomain(false)),
        (DkimSecrets, dkim_secret()),
        (SmtpAccounts, account("app", &[])),
        (AccountSecrets, password_secret("app", "s3cret\n")),
    ]
}

async fn synced(objects: Vec<(Collection, Value)>) -> (Arc<KubeSource>, ApiServer) {
    let (client, server) = ApiServer::start(objects);
    let source = KubeSource::start(client, NS.to_string());
    tokio::time::timeout(WAIT, source.wait_ready())
        .await
        .expect("first sync in time");
    (source, server)
}

fn example() -> Domain {
    Domain::parse("example.test").expect("domain")
}

/// How the current snapshot judges `app` sending from example.test.
fn sender_verdict(source: &KubeSource) -> Option<Result<(), SenderDomainRefusal>> {
    let r = source.current();
    let acct = r.account("app")?;
    Some(r.sender_domain(acct, &example()).map(|_| ()))
}

#[tokio::test]
async fn initial_list_authenticates_the_account_and_refuses_the_unverified_domain() {
    let (source, server) = synced(cluster()).await;
    let r = source.current();
    let acct = r.account("app").expect("account");
    assert_eq!(acct.id, format!("{NS}/app"));
    assert!(acct.password.as_ref().expect("password").verify("s3cret"));
    assert!(!acct.password.as_ref().expect("password").verify("wrong"));
    assert_eq!(
        r.sender_domain(acct, &example()).map(|_| ()),
        Err(SenderDomainRefusal::NotReady(
            "DNS records are not verified".into()
        ))
    );
    let domain = r.domain(&format!("{NS}/example-test")).expect("domain");
    assert_eq!(domain.keys.len(), 1);
    assert_eq!(domain.keys[0].selector, "s1");
    server.assert_nothing_refused().await;
}

#[tokio::test]
async fn maildomain_turning_ready_is_usable_without_restart() {
    let (source, server) = synced(cluster()).await;
    assert!(matches!(sender_verdict(&source), Some(Err(_))));
    server.apply(MailDomains, maildomain(true)).await;
    eventually("the domain to become usable", || async {
        sender_verdict(&source) == Some(Ok(()))
    })
    .await;
    // One watch event did it: no re-list, no new source.
    assert_eq!(server.lists(MailDomains).await, 1);
    server.assert_nothing_refused().await;
}

#[tokio::test]
async fn deleted_smtp_account_stops_authenticating_after_one_watch_event() {
    let (source, server) = synced(cluster()).await;
    assert!(source.current().account("app").is_some());
    server.delete(SmtpAccounts, "app").await;
    eventually("the account to be gone", || async {
        source.current().account("app").is_none()
    })
    .await;
    assert_eq!(server.lists(SmtpAccounts).await, 1);
    // The rest of the view is untouched.
    assert!(
        source
            .current()
            .domain(&format!("{NS}/example-test"))
            .is_some()
    );
}

#[tokio::test]
async fn password_secret_change_applies_without_restart() {
    let (source, server) = synced(cluster()).await;
    server
        .apply(AccountSecrets, password_secret("app", "n3w"))
        .await;
    eventually("the new password to authenticate", || async {
        source
            .current()
            .account("app")
            .and_then(|a| a.password.clone())
            .is_some_and(|p| p.verify("n3w") && !p.verify("s3cret"))
    })
    .await;
}

#[tokio::test]
async fn object_deleted_while_the_watch_was_gone_disappears_on_relist() {
    let (source, server) = synced(cluster()).await;
    // The account goes while no watch sees it; then the watch is told its resource version
    // is too old (410 Gone).
    server.forget(SmtpAccounts, "app").await;
    server.expire_watches(SmtpAccounts).await;
    eventually("the re-list to drop the account", || async {
        source.current().account("app").is_none()
    })
    .await;
    assert_eq!(server.lists(SmtpAccounts).await, 2);
    assert!(
        source
            .current()
            .domain(&format!("{NS}/example-test"))
            .is_some()
    );
    // And watching goes on after the re-list.
    server
        .apply(SmtpAccounts, account("app", &["192.0.2.0/24"]))
        .await;
    eventually("the account to come back", || async {
        source.current().account("app").is_some()
    })
    .await;
    server.assert_nothing_refused().await;
}

#[tokio::test]
async fn watch_that_ends_is_resumed_and_keeps_applying_changes() {
    let (source, server) = synced(cluster()).await;
    eventually("the first watch", || async {
        server.watches_started(MailDomains).await == 1
    })
    .await;
    server.end_watches(MailDomains).await;
    server.apply(MailDomains, maildomain(true)).await;
    eventually("the domain to become usable", || async {
        sender_verdict(&source) == Some(Ok(()))
    })
    .await;
    assert_eq!(server.watches_started(MailDomains).await, 2);
    // A watch that merely ended resumes from its resource version: no re-list needed.
    assert_eq!(server.lists(MailDomains).await, 1);
}

#[tokio::test]
async fn not_ready_until_every_watcher_has_listed() {
    let (client, server) = ApiServer::start(cluster());
    server.hold_lists(AccountSecrets).await;
    let source = KubeSource::start(client, NS.to_string());
    // The three other watchers have listed and moved on to watching.
    for c in [MailDomains, SmtpAccounts, DkimSecrets] {
        eventually("the other watchers to be watching", || async {
            server.watches_started(c).await >= 1
        })
        .await;
    }
    eventually("the held list to be asked for", || async {
        server.lists(AccountSecrets).await == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!source.is_ready());
    // Nothing partial is published: no account without its password.
    assert!(source.current().account("app").is_none());
    server.release_lists(AccountSecrets).await;
    tokio::time::timeout(WAIT, source.wait_ready())
        .await
        .expect("ready after the last list");
    assert!(source.is_ready());
    let r = source.current();
    let acct = r.account("app").expect("account");
    assert!(acct.password.as_ref().expect("password").verify("s3cret"));
}

#[tokio::test]
async fn data_plane_never_asks_for_unlabelled_secrets() {
    let (source, server) = synced(cluster()).await;
    server
        .apply(AccountSecrets, password_secret("app", "n3w"))
        .await;
    server.expire_watches(DkimSecrets).await;
    eventually("the DKIM Secrets to be re-listed", || async {
        server.lists(DkimSecrets).await == 2
    })
    .await;
    drop(source);
    server.assert_nothing_refused().await;
    let secrets: Vec<String> = server
        .requests()
        .await
        .into_iter()
        .filter(|r| r.contains("secrets"))
        .collect();
    assert!(!secrets.is_empty());
    for r in &secrets {
        let uri: http::Uri = r.parse().expect("uri");
        assert_eq!(
            uri.path(),
            format!("/api/v1/namespaces/{NS}/secrets"),
            "{r}"
        );
        let selector = uri
            .query()
            .unwrap_or_default()
            .split('&')
            .find_map(|kv| kv.strip_prefix("labelSelector="))
            .map(percent_decode);
        assert!(
            matches!(
                selector.as_deref(),
                Some("herald.dev/maildomain" | "herald.dev/smtpaccount")
            ),
            "Secret request without a Herald label selector: {r}"
        );
    }
    for label in ["herald.dev%2Fmaildomain", "herald.dev%2Fsmtpaccount"] {
        for mode in ["watch=true", "limit="] {
            assert!(
                secrets
                    .iter()
                    .any(|r| r.contains(label) && r.contains(mode)),
                "no {mode} request for {label} in {secrets:?}"
            );
        }
    }
}

#[tokio::test]
async fn change_that_does_not_build_keeps_the_last_good_view() {
    let (source, server) = synced(cluster()).await;
    server
        .apply(SmtpAccounts, account("broken", &["not-a-network"]))
        .await;
    server.apply(MailDomains, maildomain(true)).await;
    // Give the source time to take both events in: the view must stay the last one that
    // built, with the domain still unverified and no `broken` account.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(source.current().account("broken").is_none());
    assert!(matches!(sender_verdict(&source), Some(Err(_))));
    // Fixing the account lets every pending change through.
    server
        .apply(SmtpAccounts, account("broken", &["198.51.100.0/24"]))
        .await;
    eventually("the fixed view", || async {
        source.current().account("broken").is_some() && sender_verdict(&source) == Some(Ok(()))
    })
    .await;
}

#[tokio::test]
async fn dropping_the_source_stops_its_watches() {
    let (source, server) = synced(cluster()).await;
    eventually("the watches", || async {
        server.watches_started(SmtpAccounts).await == 1
    })
    .await;
    drop(source);
    // With the watchers gone, a closed watch is not resumed.
    server.end_watches(SmtpAccounts).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(server.watches_started(SmtpAccounts).await, 1);
}

/// The same scenarios against a real cluster, for those who have one (none can run here).
/// It creates and deletes `herald-test-*` objects in `HERALD_TEST_NAMESPACE` (default
/// `default`) of the current kubeconfig context:
///
/// ```sh
/// kind create cluster
/// cargo run --ignore-rust-version -p herald -- crds | kubectl apply -f -
/// cargo test --ignore-rust-version -p herald-core --test kube_source -- --ignored real_cluster
/// ```
#[tokio::test]
#[ignore = "needs a Kubernetes cluster with the Herald CRDs installed"]
async fn real_cluster_applies_ready_domain_and_deleted_account_without_restart() {
    use herald_core::resources::{MailDomain, SmtpAccount};
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};

    let ns = std::env::var("HERALD_TEST_NAMESPACE").unwrap_or_else(|_| "default".into());
    let client = Client::try_default().await.expect("kubeconfig");
    let rename = |mut v: Value, name: &str| {
        v["metadata"]["name"] = json!(name);
        v["metadata"]["namespace"] = json!(ns);
        v
    };
    // `create` ignores status: the MailDomain starts without `Ready`, as a new one does.
    let mut md = rename(maildomain(false), "herald-test-md");
    md["spec"]["dkim"]["secretName"] = json!("herald-test-md-dkim");
    let mut dkim = rename(dkim_secret(), "herald-test-md-dkim");
    dkim["metadata"]["labels"] = json!({"herald.dev/maildomain": "herald-test-md"});
    let mut acct = rename(account("herald-test-app", &[]), "herald-test-app");
    acct["spec"]["allowedDomains"] = json!(["herald-test-md"]);
    let pw = rename(
        password_secret("herald-test-app", "s3cret"),
        "herald-test-app-smtp",
    );

    let mds: Api<MailDomain> = Api::namespaced(client.clone(), &ns);
    let accts: Api<SmtpAccount> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let pp = PostParams::default();
    fn obj<T: serde::de::DeserializeOwned>(v: &Value) -> T {
        serde_json::from_value(v.clone()).expect("object")
    }
    mds.create(&pp, &obj(&md)).await.expect("create MailDomain");
    secrets
        .create(&pp, &obj(&dkim))
        .await
        .expect("create DKIM Secret");
    accts
        .create(&pp, &obj(&acct))
        .await
        .expect("create SmtpAccount");
    secrets
        .create(&pp, &obj(&pw))
        .await
        .expect("create password Secret");

    let source = KubeSource::start(client, ns.clone());
    tokio::time::timeout(Duration::from_secs(30), source.wait_ready())
        .await
        .expect("first sync");
    let usable = |source: &KubeSource| {
        let r = source.current();
        r.account("herald-test-app")
            .map(|a| r.sender_domain(a, &example()).is_ok())
    };
    eventually("the account, with its domain refused", || async {
        usable(&source) == Some(false)
    })
    .await;
    // Do what the operator does once DNS is verified (no operator runs in this test).
    mds.patch_status(
        "herald-test-md",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": maildomain(true)["status"]})),
    )
    .await
    .expect("status patch");
    eventually("the domain to become usable", || async {
        usable(&source) == Some(true)
    })
    .await;
    accts
        .delete("herald-test-app", &DeleteParams::default())
        .await
        .expect("delete SmtpAccount");
    eventually("the account to be gone", || async {
        source.current().account("herald-test-app").is_none()
    })
    .await;
    let _ = mds.delete("herald-test-md", &DeleteParams::default()).await;
    for s in ["herald-test-md-dkim", "herald-test-app-smtp"] {
        let _ = secrets.delete(s, &DeleteParams::default()).await;
    }
}
