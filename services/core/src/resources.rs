//! `MailDomain` and `SmtpAccount`: the resources users `kubectl apply`, and the
//! [`ResourceSource`] through which data-plane pods read them.
//!
//! The same types are registered as CRDs by the operator (`herald crds`) and read from a
//! directory of YAML documents in files mode (`herald dev`, e2e, non-Kubernetes installs).

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use k8s_openapi::api::core::v1::Secret;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{Error, password::StoredPassword, types::Domain};

/// Label on Secrets that hold a MailDomain's DKIM keys; its value is the MailDomain's name.
pub const DKIM_SECRET_LABEL: &str = "herald.dev/maildomain";

/// A sending domain: its DKIM signing, return path and how it must be verified.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "herald.dev",
    version = "v1alpha1",
    kind = "MailDomain",
    namespaced,
    status = "MailDomainStatus",
    shortname = "md",
    printcolumn = r#"{"name":"Domain","type":"string","jsonPath":".spec.domain"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MailDomainSpec {
    /// The domain mail is sent from (the part after @ in From and MAIL FROM), e.g. `example.com`.
    pub domain: String,
    /// DKIM signing of mail from this domain.
    #[serde(default)]
    pub dkim: DkimSpec,
    /// Host used in the envelope sender for bounces (e.g. `bounces.example.com`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub return_path: Option<String>,
    /// Whether the domain must pass DNS verification before mail may be sent from it.
    /// `Skip` is for development and tests only.
    #[serde(default)]
    pub verification: Verification,
}

#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DkimSpec {
    /// Selector of the key: the record lives at `<selector>._domainkey.<domain>`.
    #[serde(default = "default_selector")]
    pub selector: String,
    #[serde(default)]
    pub algorithm: DkimAlgorithm,
    /// Selector of the Ed25519 key when `algorithm` is `both` (default `<selector>-ed25519`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ed25519_selector: Option<String>,
    /// Secret holding the private keys (`rsa-sha256.pem`, `ed25519-sha256.pem`);
    /// default `<MailDomain name>-dkim`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
}

fn default_selector() -> String {
    "herald".into()
}

impl Default for DkimSpec {
    fn default() -> Self {
        DkimSpec {
            selector: default_selector(),
            algorithm: DkimAlgorithm::default(),
            ed25519_selector: None,
            secret_name: None,
        }
    }
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DkimAlgorithm {
    /// RSA 2048 bits with SHA-256: accepted by every verifier.
    #[default]
    #[serde(rename = "rsa-sha256")]
    RsaSha256,
    /// Ed25519 with SHA-256 (RFC 8463): short keys, not yet verified everywhere.
    #[serde(rename = "ed25519-sha256")]
    Ed25519Sha256,
    /// Both signatures on every message.
    #[serde(rename = "both")]
    Both,
}

impl DkimAlgorithm {
    /// The key name inside the DKIM Secret for one algorithm.
    pub fn secret_key(self) -> &'static str {
        match self {
            DkimAlgorithm::RsaSha256 | DkimAlgorithm::Both => "rsa-sha256.pem",
            DkimAlgorithm::Ed25519Sha256 => "ed25519-sha256.pem",
        }
    }
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Verification {
    #[default]
    Required,
    Skip,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MailDomainStatus {
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Name of the Secret holding the DKIM keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dkim_secret: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub message: String,
}

/// An account that apps authenticate as, and what it may send.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "herald.dev",
    version = "v1alpha1",
    kind = "SmtpAccount",
    namespaced,
    shortname = "smtpacct",
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct SmtpAccountSpec {
    /// Secret key holding the AUTH password, in clear or as an Argon2 PHC hash
    /// (`herald hash-password`). The AUTH username is the account's name.
    pub password_secret: SecretKeyRef,
    /// MailDomains (names, same namespace) this account may send from; any local part.
    #[serde(default)]
    pub allowed_domains: Vec<String>,
    /// Client networks, hourly limit, sender defaults and egress pool.
    #[serde(flatten)]
    pub policy: crate::account::AccountPolicy,
}

#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema)]
pub struct SecretKeyRef {
    pub name: String,
    pub key: String,
}

/// A DKIM private key ready for a signer: PEM text as stored in the Secret.
#[derive(Clone)]
pub struct DkimKeyMaterial {
    pub selector: String,
    pub algorithm: DkimAlgorithm,
    pub private_key_pem: String,
}

impl std::fmt::Debug for DkimKeyMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DkimKeyMaterial")
            .field("selector", &self.selector)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

/// A MailDomain as the data plane sees it.
#[derive(Debug, Clone)]
pub struct DomainView {
    /// `namespace/name`, carried in queue entries.
    pub id: String,
    pub name: String,
    pub namespace: String,
    pub domain: Domain,
    /// Signing keys, one per algorithm asked for.
    pub keys: Vec<DkimKeyMaterial>,
    /// `Err(reason)` while mail from this domain must be refused.
    pub ready: Result<(), String>,
}

/// An SmtpAccount as the data plane sees it.
#[derive(Debug, Clone)]
pub struct AccountView {
    /// `namespace/name`, carried in queue entries and event subjects.
    pub id: String,
    pub name: String,
    pub namespace: String,
    /// `None` when its Secret or key is missing: such an account cannot authenticate.
    pub password: Option<StoredPassword>,
    pub allowed_domains: Vec<String>,
    pub policy: crate::account::AccountPolicy,
    /// `policy.client_networks`, parsed.
    pub networks: Vec<ipnet::IpNet>,
}

/// Why a sender domain may not be used by an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderDomainRefusal {
    NotAllowed,
    NotReady(String),
}

/// One consistent view of every resource.
#[derive(Debug, Default)]
pub struct Resources {
    domains: HashMap<String, DomainView>,
    accounts: HashMap<String, AccountView>,
}

impl Resources {
    pub fn account(&self, username: &str) -> Option<&AccountView> {
        self.accounts.get(username)
    }

    /// The account whose client networks contain `ip` (the most specific network wins).
    pub fn account_for_client(&self, ip: std::net::IpAddr) -> Option<&AccountView> {
        self.accounts
            .values()
            .flat_map(|a| {
                a.networks
                    .iter()
                    .filter(|n| n.contains(&ip))
                    .map(move |n| (n.prefix_len(), a))
            })
            .max_by_key(|(len, _)| *len)
            .map(|(_, a)| a)
    }

    pub fn domain(&self, id: &str) -> Option<&DomainView> {
        self.domains.get(id)
    }

    /// The MailDomain through which `account` may send from `domain`.
    pub fn sender_domain(
        &self,
        account: &AccountView,
        domain: &Domain,
    ) -> Result<&DomainView, SenderDomainRefusal> {
        let view = account
            .allowed_domains
            .iter()
            .filter_map(|name| self.domains.get(&format!("{}/{}", account.namespace, name)))
            .find(|d| &d.domain == domain)
            .ok_or(SenderDomainRefusal::NotAllowed)?;
        view.ready
            .clone()
            .map_err(SenderDomainRefusal::NotReady)
            .map(|()| view)
    }

    /// Builds the view from parsed documents, resolving Secret references.
    pub fn from_documents(docs: Documents) -> Result<Resources, String> {
        let secret = |ns: &str, name: &str| docs.secrets.get(&format!("{ns}/{name}"));
        let mut domains = HashMap::new();
        for md in &docs.mail_domains {
            let name = md.metadata.name.clone().unwrap_or_default();
            let namespace = md
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            let domain = Domain::parse(&md.spec.domain).ok_or_else(|| {
                format!(
                    "MailDomain {namespace}/{name}: invalid domain {:?}",
                    md.spec.domain
                )
            })?;
            let secret_name = md
                .spec
                .dkim
                .secret_name
                .clone()
                .or_else(|| md.status.as_ref().and_then(|s| s.dkim_secret.clone()))
                .unwrap_or_else(|| format!("{name}-dkim"));
            let data = secret(&namespace, &secret_name);
            let dkim = &md.spec.dkim;
            let wanted: Vec<(String, DkimAlgorithm)> = match dkim.algorithm {
                DkimAlgorithm::RsaSha256 => vec![(dkim.selector.clone(), DkimAlgorithm::RsaSha256)],
                DkimAlgorithm::Ed25519Sha256 => {
                    vec![(dkim.selector.clone(), DkimAlgorithm::Ed25519Sha256)]
                }
                DkimAlgorithm::Both => vec![
                    (dkim.selector.clone(), DkimAlgorithm::RsaSha256),
                    (
                        dkim.ed25519_selector
                            .clone()
                            .unwrap_or_else(|| format!("{}-ed25519", dkim.selector)),
                        DkimAlgorithm::Ed25519Sha256,
                    ),
                ],
            };
            let mut keys = Vec::new();
            let mut missing = Vec::new();
            for (selector, algorithm) in wanted {
                match data.and_then(|d| d.get(algorithm.secret_key())) {
                    Some(pem) => keys.push(DkimKeyMaterial {
                        selector,
                        algorithm,
                        private_key_pem: pem.clone(),
                    }),
                    None => missing.push(algorithm.secret_key()),
                }
            }
            let ready = if !missing.is_empty() {
                Err(format!(
                    "DKIM key {} missing from Secret {namespace}/{secret_name}",
                    missing.join(", ")
                ))
            } else if md.spec.verification == Verification::Skip {
                Ok(())
            } else {
                let ready = md.status.as_ref().and_then(|s| {
                    s.conditions
                        .iter()
                        .find(|c| c.type_ == "Ready")
                        .map(|c| c.status == "True")
                });
                match ready {
                    Some(true) => Ok(()),
                    _ => Err("DNS records are not verified".into()),
                }
            };
            let id = format!("{namespace}/{name}");
            domains.insert(
                id.clone(),
                DomainView {
                    id,
                    name,
                    namespace,
                    domain,
                    keys,
                    ready,
                },
            );
        }
        let mut accounts = HashMap::new();
        for acct in &docs.smtp_accounts {
            let name = acct.metadata.name.clone().unwrap_or_default();
            let namespace = acct
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            let r = &acct.spec.password_secret;
            let password = secret(&namespace, &r.name)
                .and_then(|d| d.get(&r.key))
                .map(|p| StoredPassword::new(p.trim_end_matches(['\r', '\n'])));
            let id = format!("{namespace}/{name}");
            let view = AccountView {
                id: id.clone(),
                name: name.clone(),
                namespace,
                password,
                allowed_domains: acct.spec.allowed_domains.clone(),
                networks: acct
                    .spec
                    .policy
                    .networks()
                    .map_err(|e| format!("SmtpAccount {id}: {e}"))?,
                policy: acct.spec.policy.clone(),
            };
            if let Some(other) = accounts.insert(name.clone(), view) {
                return Err(format!(
                    "SmtpAccount name {name} is used twice ({}): AUTH usernames must be unique",
                    other.id
                ));
            }
        }
        Ok(Resources { domains, accounts })
    }
}

/// The documents of a resource directory, by kind.
#[derive(Default)]
pub struct Documents {
    pub mail_domains: Vec<MailDomain>,
    pub smtp_accounts: Vec<SmtpAccount>,
    /// `namespace/name` -> decoded data (`data` and `stringData` merged).
    pub secrets: HashMap<String, BTreeMap<String, String>>,
}

impl Documents {
    /// Parses one YAML stream (`---` separated documents) as `kubectl apply -f` would take it.
    pub fn add_yaml(&mut self, path: &Path, text: &str) -> Result<(), Error> {
        let err = |message: String| Error::Resource {
            path: path.to_path_buf(),
            message,
        };
        for de in serde_yaml::Deserializer::from_str(text) {
            let value = serde_yaml::Value::deserialize(de).map_err(|e| err(e.to_string()))?;
            if value.is_null() {
                continue;
            }
            let api_version = value
                .get("apiVersion")
                .and_then(|v| v.as_str())
                .unwrap_or("");
            let kind = value.get("kind").and_then(|v| v.as_str()).unwrap_or("");
            match (api_version, kind) {
                ("herald.dev/v1alpha1", "MailDomain") => self.mail_domains.push(
                    serde_yaml::from_value(value).map_err(|e| err(format!("MailDomain: {e}")))?,
                ),
                ("herald.dev/v1alpha1", "SmtpAccount") => self.smtp_accounts.push(
                    serde_yaml::from_value(value).map_err(|e| err(format!("SmtpAccount: {e}")))?,
                ),
                ("v1", "Secret") => {
                    let secret: Secret =
                        serde_yaml::from_value(value).map_err(|e| err(format!("Secret: {e}")))?;
                    let ns = secret
                        .metadata
                        .namespace
                        .clone()
                        .unwrap_or_else(|| "default".into());
                    let name = secret.metadata.name.clone().unwrap_or_default();
                    let mut data = BTreeMap::new();
                    for (k, v) in secret.data.unwrap_or_default() {
                        let text = String::from_utf8(v.0)
                            .map_err(|_| err(format!("Secret {name}: {k} is not UTF-8")))?;
                        data.insert(k, text);
                    }
                    data.extend(secret.string_data.unwrap_or_default());
                    self.secrets.insert(format!("{ns}/{name}"), data);
                }
                (a, k) => {
                    tracing::warn!(path = %path.display(), api_version = a, kind = k, "ignoring document of unknown kind");
                }
            }
        }
        Ok(())
    }

    /// Reads every `*.yaml` / `*.yml` file of `dir` (not recursive), in name order.
    pub fn read_dir(dir: &Path) -> Result<(Documents, Vec<u8>), Error> {
        let read_err = |source| Error::Read {
            path: dir.to_path_buf(),
            source,
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(read_err)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
            .collect();
        files.sort();
        let mut docs = Documents::default();
        let mut fingerprint = Vec::new();
        for f in files {
            let text = std::fs::read_to_string(&f).map_err(|source| Error::Read {
                path: f.clone(),
                source,
            })?;
            fingerprint.extend_from_slice(f.as_os_str().as_encoded_bytes());
            fingerprint.extend_from_slice(text.as_bytes());
            docs.add_yaml(&f, &text)?;
        }
        Ok((docs, fingerprint))
    }
}

/// Where data-plane pods read resources from. Readers take a snapshot per decision, so a
/// reload never changes a view half-way through a transaction.
pub trait ResourceSource: Send + Sync {
    fn current(&self) -> Arc<Resources>;
}

/// Files mode: a directory re-read periodically; a broken edit keeps the last good view.
pub struct FileSource {
    current: RwLock<Arc<Resources>>,
}

impl FileSource {
    /// Loads `dir` (failing on any error) and, on a Tokio runtime, re-reads it every `interval`.
    pub fn start(dir: PathBuf, interval: Duration) -> Result<Arc<FileSource>, Error> {
        let (docs, mut fingerprint) = Documents::read_dir(&dir)?;
        let resources = Resources::from_documents(docs).map_err(|message| Error::Resource {
            path: dir.clone(),
            message,
        })?;
        let source = Arc::new(FileSource {
            current: RwLock::new(Arc::new(resources)),
        });
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&source);
            handle.spawn(async move {
                loop {
                    tokio::time::sleep(interval).await;
                    let Some(source) = weak.upgrade() else { break };
                    match Documents::read_dir(&dir) {
                        Ok((_, fp)) if fp == fingerprint => {}
                        Ok((docs, fp)) => match Resources::from_documents(docs) {
                            Ok(r) => {
                                fingerprint = fp;
                                if let Ok(mut cur) = source.current.write() {
                                    *cur = Arc::new(r);
                                }
                                tracing::info!(dir = %dir.display(), "resources reloaded");
                            }
                            Err(e) => tracing::error!(dir = %dir.display(), error = %e, "keeping previous resources"),
                        },
                        Err(e) => tracing::error!(error = %e, "keeping previous resources"),
                    }
                }
            });
        }
        Ok(source)
    }
}

impl ResourceSource for FileSource {
    fn current(&self) -> Arc<Resources> {
        match self.current.read() {
            Ok(r) => r.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCS: &str = r#"
apiVersion: herald.dev/v1alpha1
kind: MailDomain
metadata: {name: example-test, namespace: default}
spec:
  domain: Example.TEST
  dkim: {selector: s1, algorithm: both}
  verification: Skip
---
apiVersion: v1
kind: Secret
metadata: {name: example-test-dkim, namespace: default}
stringData:
  rsa-sha256.pem: RSA
  ed25519-sha256.pem: ED
---
apiVersion: herald.dev/v1alpha1
kind: MailDomain
metadata: {name: unverified, namespace: default}
spec:
  domain: unverified.test
---
apiVersion: v1
kind: Secret
metadata: {name: unverified-dkim, namespace: default}
data:
  rsa-sha256.pem: UlNB
---
apiVersion: herald.dev/v1alpha1
kind: SmtpAccount
metadata: {name: app}
spec:
  passwordSecret: {name: app-smtp, key: password}
  allowedDomains: [example-test, unverified]
---
apiVersion: v1
kind: Secret
metadata: {name: app-smtp}
stringData: {password: "s3cret\n"}
"#;

    fn resources() -> Resources {
        let mut docs = Documents::default();
        docs.add_yaml(Path::new("test.yaml"), DOCS).expect("parse");
        Resources::from_documents(docs).expect("resolve")
    }

    #[test]
    fn account_authenticates_with_its_secret() {
        let r = resources();
        let acct = r.account("app").expect("account");
        assert_eq!(acct.id, "default/app");
        assert!(acct.password.as_ref().expect("password").verify("s3cret"));
        assert!(r.account("nobody").is_none());
    }

    #[test]
    fn both_algorithms_give_two_keys_with_their_selectors() {
        let r = resources();
        let d = r.domain("default/example-test").expect("domain");
        assert_eq!(d.domain.as_str(), "example.test");
        let sel: Vec<_> = d
            .keys
            .iter()
            .map(|k| (k.selector.as_str(), k.algorithm))
            .collect();
        assert_eq!(
            sel,
            vec![
                ("s1", DkimAlgorithm::RsaSha256),
                ("s1-ed25519", DkimAlgorithm::Ed25519Sha256)
            ]
        );
    }

    #[test]
    fn unverified_domain_is_refused_with_reason() {
        let r = resources();
        let acct = r.account("app").expect("account");
        let d = Domain::parse("unverified.test").expect("domain");
        assert_eq!(
            r.sender_domain(acct, &d).map(|_| ()),
            Err(SenderDomainRefusal::NotReady(
                "DNS records are not verified".into()
            ))
        );
        let ok = Domain::parse("example.test").expect("domain");
        assert!(r.sender_domain(acct, &ok).is_ok());
        let other = Domain::parse("other.test").expect("domain");
        assert_eq!(
            r.sender_domain(acct, &other).map(|_| ()),
            Err(SenderDomainRefusal::NotAllowed)
        );
    }

    #[test]
    fn missing_dkim_key_keeps_domain_not_ready() {
        let mut docs = Documents::default();
        docs.add_yaml(
            Path::new("t.yaml"),
            "apiVersion: herald.dev/v1alpha1\nkind: MailDomain\nmetadata: {name: d}\nspec: {domain: d.test, verification: Skip}\n",
        )
        .expect("parse");
        let r = Resources::from_documents(docs).expect("resolve");
        let err = r.domain("default/d").expect("domain").ready.clone();
        assert!(
            err.expect_err("not ready")
                .contains("rsa-sha256.pem missing")
        );
    }
}
