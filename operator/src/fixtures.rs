//! Reconcile scenarios against a mock API server, in the kube-rs `controller-rs` style: each
//! [`Scenario`] is the exact sequence of API calls a reconcile must make, checked in order by
//! [`ApiServerVerifier`]; DNS answers come from [`StaticDns`], so these tests need neither a
//! cluster nor a nameserver. (The hickory lookups are tested against dnsmasq in `tests/`.)

use std::{collections::HashMap, sync::Arc, time::Duration};

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use futures::future::BoxFuture;
use herald_core::resources::{
    Condition, DkimAlgorithm, DkimSpec, DmarcSpec, MailDomain, MailDomainSpec, MailDomainStatus,
    SmtpAccount, Verification,
};
use http::{Method, Request, Response};
use k8s_openapi::{
    ByteString,
    api::{coordination::v1::Lease, core::v1::Secret},
};
use kube::{Client, ResourceExt, client::Body, runtime::events::Recorder};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use crate::{
    controller::Context,
    dkim::{self, PublicKey},
    dns::{Lookup, LookupError},
    records::{self, DnsPolicy},
};

pub const NS: &str = "default";
pub const UID: &str = "0b6b6d4e-6f1c-4b61-9a57-8a4c1a0c5e11";
pub const NOW: &str = "2026-11-28T09:00:00Z";
pub const EGRESS_IP: &str = "192.0.2.10";

/// DNS answers by name; anything not listed is NXDOMAIN.
#[derive(Default, Clone)]
pub struct StaticDns {
    txt: HashMap<String, Vec<String>>,
}

impl StaticDns {
    pub fn txt(mut self, name: &str, value: &str) -> StaticDns {
        self.txt
            .entry(name.to_string())
            .or_default()
            .push(value.to_string());
        self
    }

    /// A DKIM key record for `pem` at `<selector>._domainkey.example.test`.
    pub fn dkim(self, selector: &str, alg: DkimAlgorithm, pem: &str) -> StaticDns {
        let key = PublicKey::from_private_pem(alg, pem).expect("test key");
        self.txt(
            &format!("{selector}._domainkey.example.test"),
            &key.txt_value(),
        )
    }

    /// Every record `md` needs, published correctly for the keys in `secret`.
    pub fn published_for(md: &MailDomain, secret: &Secret) -> StaticDns {
        let domain = &md.spec.domain;
        let mut dns = StaticDns::default()
            .txt(
                &format!("{}.{domain}", records::OWNERSHIP_LABEL),
                &format!("herald-verification={}", records::ownership_token(UID)),
            )
            .txt(domain, &format!("v=spf1 ip4:{EGRESS_IP} -all"))
            .txt(&format!("_dmarc.{domain}"), "v=DMARC1; p=reject");
        for (selector, alg) in md.spec.dkim.keys() {
            let pem = secret_pem(secret, alg.secret_key());
            let key = PublicKey::from_private_pem(alg, &pem).expect("test key");
            dns = dns.txt(&format!("{selector}._domainkey.{domain}"), &key.txt_value());
        }
        dns
    }
}

impl Lookup for StaticDns {
    fn txt<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Vec<String>, LookupError>> {
        let answer = self
            .txt
            .get(name)
            .cloned()
            .ok_or(LookupError::NotFound("TXT"));
        Box::pin(async move { answer })
    }

    fn cname<'a>(&'a self, _name: &'a str) -> BoxFuture<'a, Result<Vec<String>, LookupError>> {
        Box::pin(async { Err(LookupError::NotFound("CNAME")) })
    }

    fn mx<'a>(&'a self, _name: &'a str) -> BoxFuture<'a, Result<Vec<String>, LookupError>> {
        Box::pin(async { Err(LookupError::NotFound("MX")) })
    }

    fn ptr(&self, _ip: std::net::IpAddr) -> BoxFuture<'_, Result<Vec<String>, LookupError>> {
        Box::pin(async { Err(LookupError::NotFound("PTR")) })
    }

    fn addrs<'a>(
        &'a self,
        _name: &'a str,
    ) -> BoxFuture<'a, Result<Vec<std::net::IpAddr>, LookupError>> {
        Box::pin(async { Err(LookupError::NotFound("A/AAAA")) })
    }
}

pub fn secret_pem(secret: &Secret, key: &str) -> String {
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .unwrap_or_else(|| panic!("Secret has no {key}"));
    String::from_utf8(bytes.0.clone()).expect("PEM is UTF-8")
}

pub fn maildomain(algorithm: DkimAlgorithm, verification: Verification) -> MailDomain {
    let mut md = MailDomain::new(
        "example-test",
        MailDomainSpec {
            domain: "example.test".into(),
            dkim: DkimSpec {
                selector: "s1".into(),
                algorithm,
                ed25519_selector: None,
                secret_name: None,
                rotate_after: None,
                rotation_grace: None,
            },
            return_path: None,
            dmarc: DmarcSpec::default(),
            mx: Vec::new(),
            verification,
            smarthost: None,
            egress_pool: None,
        },
    );
    md.metadata.namespace = Some(NS.into());
    md.metadata.uid = Some(UID.into());
    md.metadata.generation = Some(3);
    md
}

/// A DKIM Secret as the operator would have made it for `md`.
pub fn dkim_secret(md: &MailDomain) -> Secret {
    let data = md
        .spec
        .dkim
        .keys()
        .into_iter()
        .map(|(_, alg)| {
            let pem = dkim::generate(alg).expect("generate");
            (alg.secret_key().to_string(), ByteString(pem.into_bytes()))
        })
        .collect();
    let mut secret: Secret = serde_json::from_value(json!({
        "metadata": {
            "name": format!("{}-dkim", md.name_any()),
            "namespace": NS,
            "labels": {"herald.dev/maildomain": md.name_any()},
        },
    }))
    .expect("secret");
    secret.data = Some(data);
    secret
}

pub fn account(domains: &[&str]) -> SmtpAccount {
    // From JSON, as a user would write it: every other spec field takes its default.
    serde_json::from_value(json!({
        "apiVersion": "herald.dev/v1alpha1",
        "kind": "SmtpAccount",
        "metadata": {"name": "app", "namespace": NS, "generation": 1},
        "spec": {
            "passwordSecret": {"name": "app-smtp", "key": "password"},
            "allowedDomains": domains,
        },
    }))
    .expect("SmtpAccount")
}

/// The API calls a reconcile must make, in order.
pub enum Scenario {
    /// GET the DKIM Secret (404), POST a new one, PATCH the MailDomain's status.
    SecretCreated(MailDomain),
    /// GET the DKIM Secret (found, complete), PATCH the status; nothing written to the Secret.
    SecretReused(MailDomain, Secret),
    /// GET the password Secret (found), GET each MailDomain (`None`: 404), PATCH the
    /// SmtpAccount's status.
    AccountReferencesChecked(SmtpAccount, Secret, Vec<(String, Option<MailDomain>)>),
    /// GET the DKIM Secret (found), PATCH it (a rotation step), PATCH the status.
    SecretPatched(MailDomain, Secret),
    /// GET the Lease (404), POST a new one.
    LeaseCreated,
    /// GET the Lease (found); nothing written.
    LeaseRead(Lease),
    /// GET the Lease (found), PUT it back, answered with this HTTP status (409: lost race).
    LeaseReplaced(Lease, u16),
}

/// What the mock API server received: the bodies of every write, in order.
#[derive(Debug, Default)]
pub struct Received {
    pub created_secret: Option<Secret>,
    pub status_patch: Value,
    /// `(type, reason)` of every Event posted after the status patch.
    pub events: Vec<(String, String)>,
    /// The Lease as written (POST or PUT).
    pub lease_write: Option<Lease>,
    /// The merge patch written to the DKIM Secret.
    pub secret_patch: Value,
}

pub const LEASE_PATH: &str =
    "/apis/coordination.k8s.io/v1/namespaces/default/leases/herald-operator";

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
type Responder = tower_test::mock::SendResponse<Response<Body>>;

pub struct ApiServerVerifier(Handle);

fn respond(send: Responder, code: u16, body: &Value) {
    let bytes = serde_json::to_vec(body).expect("json");
    send.send_response(
        Response::builder()
            .status(code)
            .body(Body::from(bytes))
            .expect("response"),
    );
}

fn not_found(send: Responder, what: &str) {
    respond(
        send,
        404,
        &json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("{what} not found"), "reason": "NotFound", "code": 404,
        }),
    );
}

impl ApiServerVerifier {
    /// The next request, checked against the method and path the scenario expects.
    async fn expect(&mut self, method: Method, path: &str) -> (http::Uri, Value, Responder) {
        let (request, send) = tokio::time::timeout(Duration::from_secs(5), self.0.next_request())
            .await
            .unwrap_or_else(|_| panic!("no request came; expected {method} {path}"))
            .expect("service not called");
        let (parts, body) = request.into_parts();
        assert_eq!(
            (parts.method.clone(), parts.uri.path()),
            (method, path),
            "unexpected call {}",
            parts.uri
        );
        let bytes = body.collect_bytes().await.expect("request body");
        let json = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("request body is JSON")
        };
        (parts.uri, json, send)
    }

    /// A status patch must be a forced server-side apply under our field manager.
    async fn expect_status_apply(&mut self, path: &str, object: Value) -> Value {
        let (uri, body, send) = self.expect(Method::PATCH, path).await;
        let query = uri.query().unwrap_or_default();
        assert!(query.contains("fieldManager=herald-operator"), "{query}");
        assert!(query.contains("force=true"), "{query}");
        let mut object = object;
        object["status"] = body["status"].clone();
        respond(send, 200, &object);
        body
    }

    pub fn run(mut self, scenario: Scenario) -> JoinHandle<Received> {
        tokio::spawn(async move {
            let mut received = Received::default();
            match scenario {
                Scenario::SecretCreated(md) => {
                    let secret = format!("/api/v1/namespaces/{NS}/secrets/{}-dkim", md.name_any());
                    let (_, _, send) = self.expect(Method::GET, &secret).await;
                    not_found(send, "secret");
                    let (_, body, send) = self
                        .expect(Method::POST, &format!("/api/v1/namespaces/{NS}/secrets"))
                        .await;
                    respond(send, 201, &body);
                    received.created_secret = Some(serde_json::from_value(body).expect("Secret"));
                    received.status_patch = self
                        .expect_status_apply(&status_path(&md), to_json(&md))
                        .await;
                }
                Scenario::SecretReused(md, secret) => {
                    let path = format!("/api/v1/namespaces/{NS}/secrets/{}", secret.name_any());
                    let (_, _, send) = self.expect(Method::GET, &path).await;
                    respond(send, 200, &to_json(&secret));
                    received.status_patch = self
                        .expect_status_apply(&status_path(&md), to_json(&md))
                        .await;
                }
                Scenario::AccountReferencesChecked(acct, secret, domains) => {
                    let path = format!("/api/v1/namespaces/{NS}/secrets/{}", secret.name_any());
                    let (_, _, send) = self.expect(Method::GET, &path).await;
                    respond(send, 200, &to_json(&secret));
                    for (name, md) in domains {
                        let path =
                            format!("/apis/herald.dev/v1alpha1/namespaces/{NS}/maildomains/{name}");
                        let (_, _, send) = self.expect(Method::GET, &path).await;
                        match md {
                            Some(md) => respond(send, 200, &to_json(&md)),
                            None => not_found(send, "maildomain"),
                        }
                    }
                    let path = format!(
                        "/apis/herald.dev/v1alpha1/namespaces/{NS}/smtpaccounts/{}/status",
                        acct.name_any()
                    );
                    received.status_patch = self.expect_status_apply(&path, to_json(&acct)).await;
                }
                Scenario::SecretPatched(md, secret) => {
                    let path = format!("/api/v1/namespaces/{NS}/secrets/{}", secret.name_any());
                    let (_, _, send) = self.expect(Method::GET, &path).await;
                    respond(send, 200, &to_json(&secret));
                    let (_, body, send) = self.expect(Method::PATCH, &path).await;
                    respond(send, 200, &to_json(&secret));
                    received.secret_patch = body;
                    received.status_patch = self
                        .expect_status_apply(&status_path(&md), to_json(&md))
                        .await;
                }
                Scenario::LeaseCreated => {
                    let (_, _, send) = self.expect(Method::GET, LEASE_PATH).await;
                    not_found(send, "lease");
                    let (_, body, send) = self
                        .expect(
                            Method::POST,
                            &format!("/apis/coordination.k8s.io/v1/namespaces/{NS}/leases"),
                        )
                        .await;
                    respond(send, 201, &body);
                    received.lease_write = Some(serde_json::from_value(body).expect("Lease"));
                }
                Scenario::LeaseRead(lease) => {
                    let (_, _, send) = self.expect(Method::GET, LEASE_PATH).await;
                    respond(send, 200, &to_json(&lease));
                }
                Scenario::LeaseReplaced(lease, code) => {
                    let (_, _, send) = self.expect(Method::GET, LEASE_PATH).await;
                    respond(send, 200, &to_json(&lease));
                    let (_, body, send) = self.expect(Method::PUT, LEASE_PATH).await;
                    if code == 409 {
                        respond(
                            send,
                            409,
                            &json!({
                                "kind": "Status", "apiVersion": "v1", "metadata": {},
                                "status": "Failure", "reason": "Conflict", "code": 409,
                                "message": "the object has been modified",
                            }),
                        );
                    } else {
                        respond(send, code, &body);
                    }
                    received.lease_write = Some(serde_json::from_value(body).expect("Lease"));
                }
            }
            // After the status, only Events may follow, until the reconcile drops its
            // client; any other call fails the scenario.
            let events = format!("/apis/events.k8s.io/v1/namespaces/{NS}/events");
            while let Some((request, send)) = self.0.next_request().await {
                assert_eq!(
                    (request.method(), request.uri().path()),
                    (&Method::POST, events.as_str()),
                    "only Events may follow the status patch"
                );
                let bytes = request.into_body().collect_bytes().await.expect("body");
                let event: Value = serde_json::from_slice(&bytes).expect("event JSON");
                let field = |k: &str| event[k].as_str().unwrap_or_default().to_string();
                received.events.push((field("type"), field("reason")));
                respond(send, 201, &event);
            }
            received
        })
    }
}

fn status_path(md: &MailDomain) -> String {
    format!(
        "/apis/herald.dev/v1alpha1/namespaces/{NS}/maildomains/{}/status",
        md.name_any()
    )
}

fn to_json(v: &impl serde::Serialize) -> Value {
    serde_json::to_value(v).expect("json")
}

/// A context around a mock API server; requeue intervals of 1 and 60 minutes.
pub fn context(dns: StaticDns) -> (Arc<Context>, ApiServerVerifier) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, NS);
    let ctx = Context {
        recorder: Recorder::new(client.clone(), "herald-operator".into()),
        client,
        lookup: Arc::new(dns),
        policy: DnsPolicy {
            egress_ips: vec![EGRESS_IP.parse().expect("ip")],
            ..DnsPolicy::default()
        },
        requeue_pending: Duration::from_secs(60),
        requeue_verified: Duration::from_secs(3600),
        clock: || NOW.to_string(),
    };
    (Arc::new(ctx), ApiServerVerifier(handle))
}

pub fn status_of(patch: &Value) -> MailDomainStatus {
    serde_json::from_value(patch["status"].clone()).expect("MailDomain status")
}

pub fn condition<'a>(conditions: &'a [Condition], type_: &str) -> &'a Condition {
    conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {conditions:?}"))
}

#[cfg(test)]
mod tests {
    use herald_core::resources::{DnsRecordStatus, RecordPurpose, RecordState, SmtpAccountStatus};
    use kube::runtime::controller::Action;

    use super::*;
    use crate::controller::{reconcile_account, reconcile_domain};

    fn normal(reason: &str) -> (String, String) {
        ("Normal".into(), reason.into())
    }

    fn warning(reason: &str) -> (String, String) {
        ("Warning".into(), reason.into())
    }

    async fn finish(mock: JoinHandle<Received>) -> Received {
        tokio::time::timeout(Duration::from_secs(5), mock)
            .await
            .expect("scenario finished in time")
            .expect("scenario passed")
    }

    #[tokio::test]
    async fn new_maildomain_gets_an_owned_secret_and_its_records_in_status() {
        let md = maildomain(DkimAlgorithm::Both, Verification::Required);
        let (ctx, server) = context(StaticDns::default());
        let mock = server.run(Scenario::SecretCreated(md.clone()));
        let action = reconcile_domain(Arc::new(md), ctx)
            .await
            .expect("reconcile");
        let got = finish(mock).await;
        assert_eq!(action, Action::requeue(Duration::from_secs(60)));

        let secret = got.created_secret.expect("Secret created");
        assert_eq!(secret.name_any(), "example-test-dkim");
        assert_eq!(secret.labels()["herald.dev/maildomain"], "example-test");
        let owner = &secret.owner_references()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("MailDomain", UID)
        );
        assert_eq!(owner.controller, Some(true));

        let status = status_of(&got.status_patch);
        assert_eq!(status.dkim_secret.as_deref(), Some("example-test-dkim"));
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(status.last_check_time.as_deref(), Some(NOW));
        // Each selector's record is the public half of the key just stored.
        let names: Vec<&str> = status.selectors.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "s1._domainkey.example.test",
                "s1-ed25519._domainkey.example.test"
            ]
        );
        for s in &status.selectors {
            let pem = secret_pem(&secret, s.algorithm.secret_key());
            let key = PublicKey::from_private_pem(s.algorithm, &pem).expect("stored key");
            assert_eq!(s.value, key.txt_value());
            assert_eq!(s.strings.concat(), s.value);
        }
        let rows: Vec<(RecordPurpose, &str, RecordState)> = status
            .records
            .iter()
            .map(|r| (r.purpose, r.name.as_str(), r.state))
            .collect();
        assert_eq!(
            rows,
            [
                (
                    RecordPurpose::Ownership,
                    "_herald-challenge.example.test",
                    RecordState::Missing
                ),
                (
                    RecordPurpose::Dkim,
                    "s1._domainkey.example.test",
                    RecordState::Missing
                ),
                (
                    RecordPurpose::Dkim,
                    "s1-ed25519._domainkey.example.test",
                    RecordState::Missing
                ),
                (RecordPurpose::Spf, "example.test", RecordState::Missing),
                (
                    RecordPurpose::Dmarc,
                    "_dmarc.example.test",
                    RecordState::Missing
                ),
            ]
        );
        assert_eq!(condition(&status.conditions, "DkimKeyReady").status, "True");
        let ready = condition(&status.conditions, "Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "RecordsNotVerified")
        );
        assert!(
            ready.message.contains("TXT _dmarc.example.test Missing"),
            "{}",
            ready.message
        );
        assert_eq!(
            status.summary.and_then(|s| s.dkim),
            Some(RecordState::Missing)
        );
        assert_eq!(got.events, [normal("DkimKeyCreated")]);
    }

    #[tokio::test]
    async fn existing_secret_is_reused_and_verified_domain_requeues_slowly() {
        let md = maildomain(DkimAlgorithm::RsaSha256, Verification::Required);
        let secret = dkim_secret(&md);
        let (ctx, server) = context(StaticDns::published_for(&md, &secret));
        let mock = server.run(Scenario::SecretReused(md.clone(), secret));
        let action = reconcile_domain(Arc::new(md), ctx)
            .await
            .expect("reconcile");
        let got = finish(mock).await;
        assert!(got.created_secret.is_none());
        assert_eq!(action, Action::requeue(Duration::from_secs(3600)));
        let status = status_of(&got.status_patch);
        assert!(
            status
                .records
                .iter()
                .all(|r| r.state == RecordState::Verified),
            "{:#?}",
            status.records
        );
        let ready = condition(&status.conditions, "Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "Verified")
        );
        assert_eq!(ready.last_transition_time.as_deref(), Some(NOW));
        // A first check that verifies everything says so, record by record.
        assert_eq!(
            got.events,
            [
                normal("RecordVerified"),
                normal("RecordVerified"),
                normal("RecordVerified"),
                normal("RecordVerified"),
                normal("Ready"),
            ]
        );
    }

    #[tokio::test]
    async fn missing_egress_ptr_is_reported_without_blocking_the_domain() {
        let md = maildomain(DkimAlgorithm::RsaSha256, Verification::Required);
        let secret = dkim_secret(&md);
        let dns = StaticDns::published_for(&md, &secret);
        let policy = DnsPolicy {
            egress_ips: vec![EGRESS_IP.parse().expect("ip")],
            egress_names: vec![(EGRESS_IP.parse().expect("ip"), "mta1.example.test".into())],
            ..DnsPolicy::default()
        };
        let data = crate::controller::decode(&secret);
        let status = crate::domain::observe(
            &dns,
            &policy,
            crate::domain::Observation {
                md: &md,
                secret: Some(&data),
                secret_name: "example-test-dkim",
                ownership_token: Some(records::ownership_token(UID)),
                now: NOW.into(),
                secret_labelled: true,
            },
        )
        .await;
        let ptr = status
            .records
            .iter()
            .find(|r| r.purpose == RecordPurpose::Ptr)
            .expect("PTR row");
        assert_eq!(
            (ptr.name.as_str(), ptr.state),
            ("10.2.0.192.in-addr.arpa", RecordState::Missing)
        );
        assert_eq!(condition(&status.conditions, "Ready").status, "True");
    }

    #[tokio::test]
    async fn key_for_a_newly_asked_algorithm_is_added_to_our_secret() {
        let rsa_only = maildomain(DkimAlgorithm::RsaSha256, Verification::Skip);
        let secret = dkim_secret(&rsa_only);
        let both = maildomain(DkimAlgorithm::Both, Verification::Skip);
        let (ctx, server) = context(StaticDns::default());
        let mock = server.run(Scenario::SecretPatched(both.clone(), secret.clone()));
        reconcile_domain(Arc::new(both), ctx)
            .await
            .expect("reconcile");
        let got = finish(mock).await;
        let added = got.secret_patch["data"].as_object().expect("data");
        let keys: Vec<&String> = added.keys().collect();
        assert_eq!(keys, ["ed25519-sha256.pem"], "the RSA key is kept as it is");
        let status = status_of(&got.status_patch);
        assert_eq!(status.selectors.len(), 2);
        assert_eq!(condition(&status.conditions, "DkimKeyReady").status, "True");
    }

    #[tokio::test]
    async fn secret_made_by_someone_else_is_never_written_to() {
        let md = maildomain(DkimAlgorithm::Both, Verification::Skip);
        let mut secret = dkim_secret(&maildomain(DkimAlgorithm::RsaSha256, Verification::Skip));
        secret.metadata.labels = None;
        let (ctx, server) = context(StaticDns::default());
        let mock = server.run(Scenario::SecretReused(md.clone(), secret));
        reconcile_domain(Arc::new(md), ctx)
            .await
            .expect("reconcile");
        let status = status_of(&finish(mock).await.status_patch);
        let keys = condition(&status.conditions, "DkimKeyReady");
        assert_eq!(
            (keys.status.as_str(), keys.reason.as_str()),
            ("False", "KeyMissing")
        );
        assert_eq!(
            keys.message,
            "DKIM Secret example-test-dkim has no ed25519-sha256.pem key"
        );
        assert_eq!(condition(&status.conditions, "Ready").status, "False");
    }

    #[tokio::test]
    async fn unlabelled_user_secret_is_reported_with_the_command_that_fixes_it() {
        let md = maildomain(DkimAlgorithm::RsaSha256, Verification::Skip);
        let mut secret = dkim_secret(&md);
        secret.metadata.labels = None;
        let (ctx, server) = context(StaticDns::default());
        let mock = server.run(Scenario::SecretReused(md.clone(), secret));
        reconcile_domain(Arc::new(md), ctx)
            .await
            .expect("reconcile");
        let status = status_of(&finish(mock).await.status_patch);
        let keys = condition(&status.conditions, "DkimKeyReady");
        assert_eq!(
            (keys.status.as_str(), keys.reason.as_str()),
            ("False", "SecretNotLabelled")
        );
        assert!(
            keys.message.contains(
                "kubectl label secret example-test-dkim herald.dev/maildomain=example-test"
            ),
            "{}",
            keys.message
        );
        let ready = condition(&status.conditions, "Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "SecretNotLabelled")
        );
    }

    #[tokio::test]
    async fn deleted_secret_is_recreated_and_status_shows_the_new_record() {
        let mut md = maildomain(DkimAlgorithm::RsaSha256, Verification::Required);
        // Status from before the Secret was deleted: verified with the old key.
        let old = dkim_secret(&md);
        let old_value = PublicKey::from_private_pem(
            DkimAlgorithm::RsaSha256,
            &secret_pem(&old, "rsa-sha256.pem"),
        )
        .expect("old key")
        .txt_value();
        md.status = Some(MailDomainStatus {
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: "True".into(),
                reason: "Verified".into(),
                message: String::new(),
                last_transition_time: Some("2026-01-01T00:00:00Z".into()),
                observed_generation: Some(3),
            }],
            dkim_secret: Some("example-test-dkim".into()),
            records: vec![DnsRecordStatus {
                purpose: RecordPurpose::Dkim,
                type_: "TXT".into(),
                name: "s1._domainkey.example.test".into(),
                expected: old_value.clone(),
                observed: vec![old_value.clone()],
                state: RecordState::Verified,
                message: "public key matches".into(),
            }],
            ..MailDomainStatus::default()
        });
        // DNS still publishes the old key.
        let (ctx, server) = context(StaticDns::published_for(&md, &old));
        let mock = server.run(Scenario::SecretCreated(md.clone()));
        let action = reconcile_domain(Arc::new(md), ctx)
            .await
            .expect("reconcile");
        let got = finish(mock).await;
        assert_eq!(action, Action::requeue(Duration::from_secs(60)));
        let status = status_of(&got.status_patch);
        assert_ne!(
            status.selectors[0].value, old_value,
            "a new key, a new record"
        );
        let dkim = status
            .records
            .iter()
            .find(|r| r.purpose == RecordPurpose::Dkim)
            .expect("DKIM row");
        assert_eq!(dkim.state, RecordState::Mismatch);
        assert_eq!(dkim.observed, vec![old_value]);
        assert_eq!(dkim.expected, status.selectors[0].value);
        let ready = condition(&status.conditions, "Ready");
        assert_eq!(ready.status, "False");
        assert_eq!(
            ready.last_transition_time.as_deref(),
            Some(NOW),
            "it changed now"
        );
        assert_eq!(
            got.events,
            [
                normal("DkimKeyCreated"),
                normal("RecordVerified"),
                warning("RecordLost"),
                normal("RecordVerified"),
                normal("RecordVerified"),
                warning("NotReady"),
            ]
        );
    }

    #[tokio::test]
    async fn skipped_verification_is_ready_with_keys_even_without_dns() {
        let md = maildomain(DkimAlgorithm::Ed25519Sha256, Verification::Skip);
        let secret = dkim_secret(&md);
        let (ctx, server) = context(StaticDns::default());
        let mock = server.run(Scenario::SecretReused(md.clone(), secret));
        reconcile_domain(Arc::new(md), ctx)
            .await
            .expect("reconcile");
        let got = finish(mock).await;
        let status = status_of(&got.status_patch);
        let ready = condition(&status.conditions, "Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "VerificationSkipped")
        );
        assert_eq!(got.events, [normal("Ready")]);
        assert_eq!(condition(&status.conditions, "DnsVerified").status, "False");
    }

    #[tokio::test]
    async fn smtpaccount_with_missing_domain_is_not_ready_with_the_reason() {
        let acct = account(&["example-test", "nope"]);
        let password: Secret = serde_json::from_value(json!({
            "metadata": {"name": "app-smtp", "namespace": NS},
            "data": {"password": B64.encode("s3cret")},
        }))
        .expect("secret");
        let mut ready_md = maildomain(DkimAlgorithm::RsaSha256, Verification::Skip);
        ready_md.status = Some(MailDomainStatus {
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: "True".into(),
                reason: "VerificationSkipped".into(),
                message: String::new(),
                last_transition_time: None,
                observed_generation: None,
            }],
            ..MailDomainStatus::default()
        });
        let (ctx, server) = context(StaticDns::default());
        let mock = server.run(Scenario::AccountReferencesChecked(
            acct.clone(),
            password,
            vec![
                ("example-test".into(), Some(ready_md)),
                ("nope".into(), None),
            ],
        ));
        let action = reconcile_account(Arc::new(acct), ctx)
            .await
            .expect("reconcile");
        let got = finish(mock).await;
        assert_eq!(action, Action::requeue(Duration::from_secs(60)));
        let status: SmtpAccountStatus =
            serde_json::from_value(got.status_patch["status"].clone()).expect("status");
        assert_eq!(condition(&status.conditions, "SecretReady").status, "True");
        let ready = condition(&status.conditions, "Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "DomainNotFound")
        );
        assert_eq!(ready.message, "MailDomain nope not found");
        assert!(got.events.is_empty());
    }

    mod leader_election {
        use k8s_openapi::{
            apimachinery::pkg::apis::meta::v1::MicroTime,
            jiff::{SignedDuration, Timestamp},
        };
        use kube::Api;

        use super::*;
        use crate::lease::{Attempt, LeaseConfig, try_acquire};

        fn cfg() -> LeaseConfig {
            LeaseConfig {
                name: "herald-operator".into(),
                namespace: NS.into(),
                identity: "me".into(),
                duration: Duration::from_secs(15),
            }
        }

        fn now() -> Timestamp {
            "2026-11-28T09:00:00Z".parse().expect("time")
        }

        fn lease(holder: &str, renewed_ago: i64, transitions: i32) -> Lease {
            let mut l: Lease = serde_json::from_value(json!({
                "metadata": {"name": "herald-operator", "namespace": NS, "resourceVersion": "42"},
            }))
            .expect("lease");
            l.spec = Some(k8s_openapi::api::coordination::v1::LeaseSpec {
                holder_identity: Some(holder.into()),
                lease_duration_seconds: Some(15),
                acquire_time: Some(MicroTime(now() - SignedDuration::from_secs(3600))),
                renew_time: Some(MicroTime(now() - SignedDuration::from_secs(renewed_ago))),
                lease_transitions: Some(transitions),
                ..Default::default()
            });
            l
        }

        async fn attempt(scenario: Scenario) -> (Attempt, Received) {
            let (ctx, server) = context(StaticDns::default());
            let api: Api<Lease> = Api::namespaced(ctx.client.clone(), NS);
            // Only `api` may keep the mock alive: the scenario ends when it is dropped.
            drop(ctx);
            let mock = server.run(scenario);
            let result = try_acquire(&api, &cfg(), now()).await.expect("attempt");
            drop(api);
            (result, finish(mock).await)
        }

        fn spec_of(l: &Lease) -> k8s_openapi::api::coordination::v1::LeaseSpec {
            l.spec.clone().expect("spec")
        }

        #[tokio::test]
        async fn absent_lease_is_created_and_held() {
            let (result, got) = attempt(Scenario::LeaseCreated).await;
            assert_eq!(result, Attempt::Held);
            let spec = spec_of(&got.lease_write.expect("created"));
            assert_eq!(spec.holder_identity.as_deref(), Some("me"));
            assert_eq!(spec.lease_duration_seconds, Some(15));
            assert_eq!(spec.renew_time.map(|t| t.0), Some(now()));
        }

        #[tokio::test]
        async fn fresh_lease_of_another_replica_is_left_alone() {
            let (result, got) = attempt(Scenario::LeaseRead(lease("other", 5, 1))).await;
            assert_eq!(result, Attempt::HeldBy("other".into()));
            assert!(got.lease_write.is_none());
        }

        #[tokio::test]
        async fn expired_lease_is_taken_over_on_its_resource_version() {
            let (result, got) = attempt(Scenario::LeaseReplaced(lease("other", 60, 1), 200)).await;
            assert_eq!(result, Attempt::Held);
            let written = got.lease_write.expect("replaced");
            assert_eq!(written.metadata.resource_version.as_deref(), Some("42"));
            let spec = spec_of(&written);
            assert_eq!(spec.holder_identity.as_deref(), Some("me"));
            assert_eq!(spec.lease_transitions, Some(2));
            assert_eq!(spec.acquire_time.map(|t| t.0), Some(now()));
        }

        #[tokio::test]
        async fn lost_race_for_an_expired_lease_is_not_leadership() {
            let (result, _) = attempt(Scenario::LeaseReplaced(lease("other", 60, 1), 409)).await;
            assert_eq!(result, Attempt::HeldBy("other".into()));
        }

        #[tokio::test]
        async fn own_lease_is_renewed_keeping_its_acquire_time() {
            let (result, got) = attempt(Scenario::LeaseReplaced(lease("me", 5, 3), 200)).await;
            assert_eq!(result, Attempt::Held);
            let spec = spec_of(&got.lease_write.expect("renewed"));
            assert_eq!(spec.renew_time.map(|t| t.0), Some(now()));
            assert_eq!(
                spec.acquire_time.map(|t| t.0),
                Some(now() - SignedDuration::from_secs(3600))
            );
            assert_eq!(spec.lease_transitions, Some(3));
        }
    }

    mod rotation {
        use std::collections::BTreeMap;

        use herald_core::resources::{Documents, KeyRole, Resources};
        use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};

        use super::*;

        const NEW_SELECTOR: &str = "s1-202611280900";

        fn rotating() -> MailDomain {
            let mut md = maildomain(DkimAlgorithm::RsaSha256, Verification::Required);
            md.spec.dkim.rotate_after = Some(Duration::from_secs(90 * 24 * 3600));
            md.spec.dkim.rotation_grace = Some(Duration::from_secs(7 * 24 * 3600));
            md
        }

        fn with(secret: &Secret, entries: &[(&str, &str)]) -> Secret {
            let mut s = secret.clone();
            let data = s.data.get_or_insert_with(BTreeMap::new);
            for (k, v) in entries {
                data.insert(k.to_string(), ByteString(v.as_bytes().to_vec()));
            }
            s
        }

        /// A patch's `data` as text: `None` for a deleted entry.
        fn patched(patch: &Value) -> BTreeMap<String, Option<String>> {
            patch["data"]
                .as_object()
                .expect("data")
                .iter()
                .map(|(k, v)| {
                    let text = v
                        .as_str()
                        .map(|b| String::from_utf8(B64.decode(b).expect("base64")).expect("utf8"));
                    (k.clone(), text)
                })
                .collect()
        }

        /// The selector the data plane signs with for this MailDomain and Secret data.
        fn signing_selector(md: &MailDomain, secret: &Secret) -> String {
            let mut docs = Documents::default();
            docs.mail_domains.push(md.clone());
            docs.secrets.insert(
                format!("{NS}/{}", secret.name_any()),
                crate::controller::decode(secret),
            );
            let r = Resources::from_documents(docs).expect("resources");
            let d = r
                .domain(&format!("{NS}/{}", md.name_any()))
                .expect("domain");
            d.keys[0].selector.clone()
        }

        fn roles(status: &MailDomainStatus) -> Vec<(&str, KeyRole)> {
            status
                .selectors
                .iter()
                .map(|s| (s.selector.as_str(), s.role))
                .collect()
        }

        #[tokio::test]
        async fn old_keys_get_a_new_selector_beside_them_and_still_sign() {
            let md = rotating();
            let mut secret = dkim_secret(&md);
            let made: Timestamp = "2026-08-01T00:00:00Z".parse().expect("time");
            secret.metadata.creation_timestamp = Some(Time(made));
            let (ctx, server) = context(StaticDns::published_for(&md, &secret));
            let mock = server.run(Scenario::SecretPatched(md.clone(), secret.clone()));
            reconcile_domain(Arc::new(md.clone()), ctx)
                .await
                .expect("reconcile");
            let got = finish(mock).await;
            let patch = patched(&got.secret_patch);
            assert_eq!(
                patch.get("next.rsa-sha256.selector"),
                Some(&Some(NEW_SELECTOR.to_string()))
            );
            let next_pem = patch["next.rsa-sha256.pem"].clone().expect("next key");
            let status = status_of(&got.status_patch);
            assert_eq!(
                roles(&status),
                [("s1", KeyRole::Active), (NEW_SELECTOR, KeyRole::Next)]
            );
            let next_row = status
                .records
                .iter()
                .find(|r| r.name == format!("{NEW_SELECTOR}._domainkey.example.test"))
                .expect("next row");
            assert_eq!(next_row.state, RecordState::Missing);
            // The unpublished next key does not hold the domain back, and does not sign.
            assert_eq!(condition(&status.conditions, "Ready").status, "True");
            let after = with(
                &secret,
                &[
                    ("next.rsa-sha256.pem", &next_pem),
                    ("next.rsa-sha256.selector", NEW_SELECTOR),
                ],
            );
            assert_eq!(signing_selector(&md, &after), "s1");
            assert_eq!(got.events[0], normal("KeyRotationStarted"));
        }

        #[tokio::test]
        async fn signing_stays_on_the_old_key_until_the_new_record_is_verified() {
            let md = rotating();
            let secret = dkim_secret(&md);
            let next_pem = dkim::generate(DkimAlgorithm::RsaSha256).expect("key");
            let secret = with(
                &secret,
                &[
                    ("next.rsa-sha256.pem", &next_pem),
                    ("next.rsa-sha256.selector", NEW_SELECTOR),
                ],
            );
            // DNS has only the old record: no write to the Secret at all.
            let (ctx, server) = context(StaticDns::published_for(&md, &secret));
            let mock = server.run(Scenario::SecretReused(md.clone(), secret.clone()));
            reconcile_domain(Arc::new(md.clone()), ctx)
                .await
                .expect("reconcile");
            let status = status_of(&finish(mock).await.status_patch);
            assert_eq!(
                roles(&status),
                [("s1", KeyRole::Active), (NEW_SELECTOR, KeyRole::Next)]
            );
            assert_eq!(signing_selector(&md, &secret), "s1");
        }

        #[tokio::test]
        async fn verified_new_record_switches_signing_and_keeps_the_old_listed() {
            let md = rotating();
            let secret = dkim_secret(&md);
            let old_pem = secret_pem(&secret, "rsa-sha256.pem");
            let next_pem = dkim::generate(DkimAlgorithm::RsaSha256).expect("key");
            let secret = with(
                &secret,
                &[
                    ("next.rsa-sha256.pem", &next_pem),
                    ("next.rsa-sha256.selector", NEW_SELECTOR),
                ],
            );
            let dns = StaticDns::published_for(&md, &secret).dkim(
                NEW_SELECTOR,
                DkimAlgorithm::RsaSha256,
                &next_pem,
            );
            let (ctx, server) = context(dns);
            let mock = server.run(Scenario::SecretPatched(md.clone(), secret.clone()));
            reconcile_domain(Arc::new(md.clone()), ctx)
                .await
                .expect("reconcile");
            let got = finish(mock).await;
            let patch = patched(&got.secret_patch);
            let expect = |k: &str, v: Option<&str>| {
                assert_eq!(patch.get(k), Some(&v.map(str::to_string)), "{k}");
            };
            expect("rsa-sha256.pem", Some(&next_pem));
            expect("rsa-sha256.selector", Some(NEW_SELECTOR));
            expect("previous.rsa-sha256.pem", Some(&old_pem));
            expect("previous.rsa-sha256.selector", Some("s1"));
            expect("next.rsa-sha256.pem", None);
            expect("next.rsa-sha256.selector", None);
            expect("keys-created-at", Some(NOW));
            expect("previous-until", Some("2026-12-05T09:00:00Z"));
            let status = status_of(&got.status_patch);
            assert_eq!(
                roles(&status),
                [(NEW_SELECTOR, KeyRole::Active), ("s1", KeyRole::Previous)]
            );
            assert_eq!(condition(&status.conditions, "Ready").status, "True");
            assert!(
                got.events.contains(&normal("KeyRotated")),
                "{:?}",
                got.events
            );
            // What the data plane reads once the patch is applied: the new selector.
            let mut after = secret.clone();
            let data = after.data.get_or_insert_with(BTreeMap::new);
            for (k, v) in &patch {
                match v {
                    Some(v) => data.insert(k.clone(), ByteString(v.clone().into_bytes())),
                    None => data.remove(k),
                };
            }
            assert_eq!(signing_selector(&md, &after), NEW_SELECTOR);
        }

        #[tokio::test]
        async fn previous_key_is_removed_after_the_grace_period() {
            let md = rotating();
            let secret = dkim_secret(&md);
            let old_pem = dkim::generate(DkimAlgorithm::RsaSha256).expect("key");
            let secret = with(
                &secret,
                &[
                    ("rsa-sha256.selector", NEW_SELECTOR),
                    ("keys-created-at", "2026-11-01T00:00:00Z"),
                    ("previous.rsa-sha256.pem", &old_pem),
                    ("previous.rsa-sha256.selector", "s1"),
                    ("previous-until", "2026-11-08T00:00:00Z"),
                ],
            );
            let dns = StaticDns::default().dkim(
                NEW_SELECTOR,
                DkimAlgorithm::RsaSha256,
                &secret_pem(&secret, "rsa-sha256.pem"),
            );
            let (ctx, server) = context(dns);
            let mock = server.run(Scenario::SecretPatched(md.clone(), secret));
            reconcile_domain(Arc::new(md), ctx)
                .await
                .expect("reconcile");
            let got = finish(mock).await;
            let patch = patched(&got.secret_patch);
            assert_eq!(
                patch,
                BTreeMap::from([
                    ("previous-until".to_string(), None),
                    ("previous.rsa-sha256.pem".to_string(), None),
                    ("previous.rsa-sha256.selector".to_string(), None),
                ])
            );
            let status = status_of(&got.status_patch);
            assert_eq!(roles(&status), [(NEW_SELECTOR, KeyRole::Active)]);
            assert_eq!(got.events[0], normal("PreviousKeyRemoved"));
        }
    }
}
