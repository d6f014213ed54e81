//! `MailDomain` and `SmtpAccount`: the resources users `kubectl apply`, and the
//! [`ResourceSource`] through which data-plane pods read them.
//!
//! The same types are registered as CRDs by the operator (`herald crds`) and read either
//! from a directory of YAML documents in files mode ([`FileSource`]: `herald dev`, e2e,
//! non-Kubernetes installs) or from the cluster ([`KubeSource`]: watched, labelled Secrets
//! only). Both build their view through [`Documents`] and [`Resources::from_documents`], so
//! the rules are the same in either mode.

mod kubernetes;

pub use kubernetes::{KubeSource, namespace_for};

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

/// Label on Secrets that hold an SmtpAccount's password; its value is the account's name.
/// In Kubernetes mode data-plane pods see only Secrets carrying this label or
/// [`DKIM_SECRET_LABEL`].
pub const ACCOUNT_SECRET_LABEL: &str = "herald.dev/smtpaccount";

/// Syntax of a DNS domain name in a resource: dot-separated LDH labels (IDNs as A-labels,
/// `xn--...`), at least two labels, an optional trailing dot.
pub const DOMAIN_PATTERN: &str = r"^([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?$";

/// Syntax of a DKIM selector (RFC 6376 3.1): one or more dot-separated LDH labels.
pub const SELECTOR_PATTERN: &str = r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$";

/// A sending domain: its DKIM signing, return path, the DNS records it must publish and how
/// they are verified.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "herald.dev",
    version = "v1alpha1",
    kind = "MailDomain",
    doc = "A sending domain: its DKIM keys, the DNS records it must publish and whether mail may be sent from it.",
    namespaced,
    status = "MailDomainStatus",
    shortname = "md",
    shortname = "mdom",
    category = "herald",
    printcolumn = r#"{"name":"Domain","type":"string","jsonPath":".spec.domain"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"DKIM","type":"string","jsonPath":".status.summary.dkim"}"#,
    printcolumn = r#"{"name":"SPF","type":"string","jsonPath":".status.summary.spf"}"#,
    printcolumn = r#"{"name":"DMARC","type":"string","jsonPath":".status.summary.dmarc"}"#,
    printcolumn = r#"{"name":"MX","type":"string","jsonPath":".status.summary.mx"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MailDomainSpec {
    /// The domain mail is sent from (the part after @ in From and MAIL FROM), e.g.
    /// `example.com`. Internationalised domains are written as A-labels (`xn--...`).
    #[schemars(pattern(DOMAIN_PATTERN))]
    pub domain: String,
    /// DKIM signing of mail from this domain.
    #[serde(default)]
    pub dkim: DkimSpec,
    /// Host used in the envelope sender for bounces (e.g. `bounces.example.com`). When the
    /// operator is configured with a return-path target, this host must point at it
    /// (CNAME or MX, as the operator is configured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DOMAIN_PATTERN))]
    pub return_path: Option<String>,
    /// The DMARC policy the domain must publish at `_dmarc.<domain>`: this one or a stricter
    /// one (`none` < `quarantine` < `reject`).
    #[serde(default)]
    pub dmarc: DmarcSpec,
    /// MX hosts the domain must publish, for inbound bounce handling. Empty (the default):
    /// MX records are not checked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(pattern(DOMAIN_PATTERN)))]
    pub mx: Vec<String>,
    /// Whether the domain must pass DNS verification before mail may be sent from it.
    /// `Skip` is for development and tests only.
    #[serde(default)]
    pub verification: Verification,
    /// Send all mail from this domain through an upstream relay instead of the recipients'
    /// MX hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smarthost: Option<crate::route::SmarthostRoute>,
    /// Egress pool (a name from the delivery configuration's `pools`) this domain's mail
    /// leaves from, unless the sending SmtpAccount names its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_pool: Option<String>,
}

/// DKIM settings of a MailDomain.
#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DkimSpec {
    /// Selector of the key: the record lives at `<selector>._domainkey.<domain>`.
    #[serde(default = "default_selector")]
    #[schemars(pattern(SELECTOR_PATTERN))]
    pub selector: String,
    /// Which keys sign: `rsa-sha256` (RSA 2048 bits), `ed25519-sha256`, or `both`.
    #[serde(default)]
    pub algorithm: DkimAlgorithm,
    /// Selector of the Ed25519 key when `algorithm` is `both` (default `<selector>-ed25519`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(SELECTOR_PATTERN))]
    pub ed25519_selector: Option<String>,
    /// Secret holding the private keys (`rsa-sha256.pem`, `ed25519-sha256.pem`);
    /// default `<MailDomain name>-dkim`. The operator creates it when it does not exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: Option<String>,
    /// Replace the keys this long after they were made (e.g. `90d`); unset: never. A new key
    /// is published under a new selector beside the old one, signing switches to it once its
    /// record is verified in DNS, and the old record may be removed after `rotationGrace`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde"
    )]
    #[schemars(with = "Option<String>", pattern(DURATION_PATTERN))]
    pub rotate_after: Option<Duration>,
    /// How long a replaced key stays listed (its record published) after the switch, so
    /// mail signed with it just before can still be verified (default `7d`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde"
    )]
    #[schemars(with = "Option<String>", pattern(DURATION_PATTERN))]
    pub rotation_grace: Option<Duration>,
}

/// Syntax of a duration: one or more `<number><unit>` (`90d`, `12h 30m`).
pub const DURATION_PATTERN: &str = r"^\s*([0-9]+\s*[a-zA-Z]+\s*)+$";

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
            rotate_after: None,
            rotation_grace: None,
        }
    }
}

impl DkimSpec {
    /// Each key the spec asks for, with the selector it is published under.
    pub fn keys(&self) -> Vec<(String, DkimAlgorithm)> {
        match self.algorithm {
            DkimAlgorithm::RsaSha256 => vec![(self.selector.clone(), DkimAlgorithm::RsaSha256)],
            DkimAlgorithm::Ed25519Sha256 => {
                vec![(self.selector.clone(), DkimAlgorithm::Ed25519Sha256)]
            }
            DkimAlgorithm::Both => vec![
                (self.selector.clone(), DkimAlgorithm::RsaSha256),
                (
                    self.ed25519_selector
                        .clone()
                        .unwrap_or_else(|| format!("{}-ed25519", self.selector)),
                    DkimAlgorithm::Ed25519Sha256,
                ),
            ],
        }
    }
}

impl MailDomain {
    /// Name of the Secret holding the DKIM keys: `spec.dkim.secretName`, else the name the
    /// operator reported in status, else `<name>-dkim`.
    pub fn dkim_secret_name(&self) -> String {
        self.spec
            .dkim
            .secret_name
            .clone()
            .or_else(|| self.status.as_ref().and_then(|s| s.dkim_secret.clone()))
            .unwrap_or_else(|| format!("{}-dkim", self.metadata.name.as_deref().unwrap_or("")))
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

    pub fn as_str(self) -> &'static str {
        match self {
            DkimAlgorithm::RsaSha256 => "rsa-sha256",
            DkimAlgorithm::Ed25519Sha256 => "ed25519-sha256",
            DkimAlgorithm::Both => "both",
        }
    }

    /// The key inside the DKIM Secret naming the selector the key in [`Self::secret_key`]
    /// is published under, when it differs from the spec's (after a rotation).
    pub fn selector_key(self) -> &'static str {
        match self {
            DkimAlgorithm::RsaSha256 | DkimAlgorithm::Both => "rsa-sha256.selector",
            DkimAlgorithm::Ed25519Sha256 => "ed25519-sha256.selector",
        }
    }
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Verification {
    /// Mail flows only once every expected DNS record is verified (`Ready=True`).
    #[default]
    Required,
    /// Mail flows as soon as the DKIM keys exist; DNS is still checked and reported.
    Skip,
}

/// The DMARC policy a MailDomain asks for.
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DmarcSpec {
    /// Weakest acceptable `p=` of the published record.
    #[serde(default)]
    pub policy: DmarcPolicy,
}

/// DMARC `p=` values, weakest first (the order is used to compare them).
#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum DmarcPolicy {
    /// Monitoring only.
    None,
    /// Failing mail goes to spam.
    #[default]
    Quarantine,
    /// Failing mail is refused.
    Reject,
}

impl DmarcPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            DmarcPolicy::None => "none",
            DmarcPolicy::Quarantine => "quarantine",
            DmarcPolicy::Reject => "reject",
        }
    }

    /// Parses a `p=` value (case-insensitive, RFC 7489 6.3).
    pub fn parse(s: &str) -> Option<DmarcPolicy> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" => Some(DmarcPolicy::None),
            "quarantine" => Some(DmarcPolicy::Quarantine),
            "reject" => Some(DmarcPolicy::Reject),
            _ => None,
        }
    }
}

/// What the operator observed about a MailDomain. Rewritten whole on every check.
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MailDomainStatus {
    /// `DkimKeyReady`, `DnsVerified` and `Ready`. The data plane sends mail from a domain
    /// with `verification: Required` only while `Ready` is `True`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// `metadata.generation` of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Name of the Secret holding the DKIM keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dkim_secret: Option<String>,
    /// The DKIM keys in use and the exact TXT records that publish them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub selectors: Vec<SelectorStatus>,
    /// One row per DNS record the domain must publish.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub records: Vec<DnsRecordStatus>,
    /// The state of each kind of record at a glance (`kubectl get maildomains`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<RecordSummary>,
    /// When DNS was last checked (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check_time: Option<String>,
}

/// A DKIM key and the record that publishes it.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SelectorStatus {
    pub selector: String,
    /// `Active` (signs), `Next` (rotation: published, signs once verified) or `Previous`
    /// (rotated out: keep the record published until the grace period ends).
    #[serde(default)]
    pub role: KeyRole,
    /// `rsa-sha256` or `ed25519-sha256`.
    pub algorithm: DkimAlgorithm,
    /// Where the record goes: `<selector>._domainkey.<domain>`.
    pub name: String,
    /// The TXT record value to publish (`v=DKIM1; k=...; p=...`).
    pub value: String,
    /// The same value split into character-strings of at most 255 octets, as a zone file
    /// or DNS provider needs it for long (RSA) keys.
    pub strings: Vec<String>,
}

/// Where a DKIM key is in its life.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum KeyRole {
    #[default]
    Active,
    Next,
    Previous,
}

/// One expected DNS record and what DNS answers today.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DnsRecordStatus {
    /// What the record is for.
    pub purpose: RecordPurpose,
    /// DNS type: `TXT`, `CNAME`, `MX` or `PTR`.
    #[serde(rename = "type")]
    pub type_: String,
    /// Owner name of the record (fully qualified, no trailing dot).
    pub name: String,
    /// What to publish (or, for SPF and DMARC, what the published record must contain).
    pub expected: String,
    /// The values DNS returned (relevant records only).
    #[serde(default)]
    pub observed: Vec<String>,
    pub state: RecordState,
    /// Why the state is what it is (the resolver's error for `Error`).
    #[serde(default)]
    pub message: String,
}

/// What a DNS record is for.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RecordPurpose {
    Ownership,
    #[serde(rename = "DKIM")]
    Dkim,
    #[serde(rename = "SPF")]
    Spf,
    #[serde(rename = "DMARC")]
    Dmarc,
    ReturnPath,
    #[serde(rename = "MX")]
    Mx,
    /// Forward-confirmed reverse DNS of an egress IP against its EHLO name. Reported, but
    /// not required for `DnsVerified`: it is the installation's to fix, not the domain's.
    #[serde(rename = "PTR")]
    Ptr,
}

/// The verdict on one expected record.
#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
pub enum RecordState {
    /// DNS answers what is expected.
    Verified,
    /// Nothing is published there.
    Missing,
    /// Something is published but it is not what is expected.
    Mismatch,
    /// DNS could not be asked (timeout, SERVFAIL, ...): the record is not judged.
    Error,
}

impl RecordState {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordState::Verified => "Verified",
            RecordState::Missing => "Missing",
            RecordState::Mismatch => "Mismatch",
            RecordState::Error => "Error",
        }
    }
}

/// Worst state per record kind; absent when no record of that kind is expected.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecordSummary {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dkim: Option<RecordState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spf: Option<RecordState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dmarc: Option<RecordState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mx: Option<RecordState>,
}

/// A status condition, shaped like Kubernetes' own (`metav1.Condition`); the optional
/// fields may be left out in hand-written files-mode YAML.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready`, `DkimKeyReady`, `DnsVerified` (MailDomain); `Ready`, `DomainsReady`,
    /// `SecretReady` (SmtpAccount).
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// One CamelCase word for machines.
    #[serde(default)]
    pub reason: String,
    /// What a human needs to know, e.g. which record is missing.
    #[serde(default)]
    pub message: String,
    /// When `status` last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    /// `metadata.generation` the condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// An account that apps authenticate as, and what it may send.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "herald.dev",
    version = "v1alpha1",
    kind = "SmtpAccount",
    doc = "An account apps authenticate as over SMTP, and the MailDomains it may send from.",
    namespaced,
    status = "SmtpAccountStatus",
    shortname = "smtpacct",
    category = "herald",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
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

/// A key in a Secret of the same namespace.
#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema)]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the Secret's data.
    #[schemars(length(min = 1))]
    pub key: String,
}

/// What the operator observed about an SmtpAccount's references.
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SmtpAccountStatus {
    /// `SecretReady`, `DomainsReady` and `Ready`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// `metadata.generation` of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
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
    /// Upstream relay for all of this domain's mail.
    pub smarthost: Option<crate::route::ResolvedRoute>,
    /// Egress pool named by the MailDomain.
    pub egress_pool: Option<String>,
    /// `spec.returnPath`: host of the VERP envelope sender, so bounces come back to Herald.
    pub return_path: Option<Domain>,
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
    /// Upstream relay for all of this account's mail.
    pub smarthost: Option<crate::route::ResolvedRoute>,
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

    /// The account with id `namespace/name` (queue entries carry ids, AUTH uses names).
    pub fn account_by_id(&self, id: &str) -> Option<&AccountView> {
        self.accounts.values().find(|a| a.id == id)
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

    /// True when `host` is the return-path host of some MailDomain: the inbound listener
    /// takes bounces for it.
    pub fn is_return_path_host(&self, host: &Domain) -> bool {
        self.domains
            .values()
            .any(|d| d.return_path.as_ref() == Some(host))
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
            let secret_name = md.dkim_secret_name();
            let data = secret(&namespace, &secret_name);
            let wanted = md.spec.dkim.keys();
            let mut keys = Vec::new();
            let mut missing = Vec::new();
            for (selector, algorithm) in wanted {
                // After a rotation the Secret names the selector its key is published under.
                let selector = data
                    .and_then(|d| d.get(algorithm.selector_key()))
                    .map(|s| s.trim().to_string())
                    .unwrap_or(selector);
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
            let smarthost = md
                .spec
                .smarthost
                .as_ref()
                .map(|r| r.resolve(|n| secret(&namespace, n)));
            let return_path = match &md.spec.return_path {
                Some(host) => Some(Domain::parse(host).ok_or_else(|| {
                    format!("MailDomain {namespace}/{name}: invalid returnPath {host:?}")
                })?),
                None => None,
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
                    smarthost,
                    egress_pool: md.spec.egress_pool.clone(),
                    return_path,
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
            let smarthost = acct
                .spec
                .policy
                .smarthost
                .as_ref()
                .map(|r| r.resolve(|n| secret(&namespace, n)));
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
                smarthost,
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
                    let skipped = self.add_secret(&secret);
                    if let Some(k) = skipped.first() {
                        let name = secret.metadata.name.as_deref().unwrap_or_default();
                        return Err(err(format!("Secret {name}: {k} is not UTF-8")));
                    }
                }
                (a, k) => {
                    tracing::warn!(path = %path.display(), api_version = a, kind = k, "ignoring document of unknown kind");
                }
            }
        }
        Ok(())
    }

    /// Adds a Secret's data (`data` decoded, `stringData` merged over it) under
    /// `namespace/name`. Values that are not UTF-8 cannot be keys or passwords: they are left
    /// out, and their keys returned so the caller decides whether that is an error.
    pub fn add_secret(&mut self, secret: &Secret) -> Vec<String> {
        let ns = secret.metadata.namespace.as_deref().unwrap_or("default");
        let name = secret.metadata.name.as_deref().unwrap_or_default();
        let mut data = BTreeMap::new();
        let mut skipped = Vec::new();
        for (k, v) in secret.data.iter().flatten() {
            match std::str::from_utf8(&v.0) {
                Ok(text) => {
                    data.insert(k.clone(), text.to_string());
                }
                Err(_) => skipped.push(k.clone()),
            }
        }
        for (k, v) in secret.string_data.iter().flatten() {
            data.insert(k.clone(), v.clone());
        }
        self.secrets.insert(format!("{ns}/{name}"), data);
        skipped
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
    fn required_domain_is_usable_once_operator_status_says_ready() {
        let status = |ready: &str| {
            format!(
                r#"
apiVersion: herald.dev/v1alpha1
kind: MailDomain
metadata: {{name: d, namespace: default, generation: 2}}
spec: {{domain: d.test}}
status:
  observedGeneration: 2
  dkimSecret: d-dkim
  conditions:
  - {{type: DkimKeyReady, status: "True", reason: KeysPresent, message: ok,
     lastTransitionTime: "2026-11-28T09:00:00Z", observedGeneration: 2}}
  - {{type: Ready, status: "{ready}", reason: X, message: y,
     lastTransitionTime: "2026-11-28T09:00:00Z", observedGeneration: 2}}
  records:
  - {{purpose: DKIM, type: TXT, name: herald._domainkey.d.test, expected: "v=DKIM1; k=rsa; p=AA",
     observed: [], state: Missing, message: none}}
  summary: {{dkim: Missing}}
  lastCheckTime: "2026-11-28T09:00:00Z"
---
apiVersion: v1
kind: Secret
metadata: {{name: d-dkim, namespace: default}}
stringData: {{rsa-sha256.pem: RSA}}
"#
            )
        };
        for (ready, usable) in [("True", true), ("False", false)] {
            let mut docs = Documents::default();
            docs.add_yaml(Path::new("t.yaml"), &status(ready))
                .expect("parse");
            let r = Resources::from_documents(docs).expect("resolve");
            assert_eq!(r.domain("default/d").expect("domain").ready.is_ok(), usable);
        }
    }

    #[test]
    fn rotation_settings_read_as_durations_and_rotated_selector_signs() {
        let mut docs = Documents::default();
        docs.add_yaml(
            Path::new("t.yaml"),
            "apiVersion: herald.dev/v1alpha1\nkind: MailDomain\nmetadata: {name: d}\n\
             spec: {domain: d.test, verification: Skip, dkim: {selector: s1, rotateAfter: 90d, rotationGrace: 12h}}\n---\n\
             apiVersion: v1\nkind: Secret\nmetadata: {name: d-dkim}\n\
             stringData: {rsa-sha256.pem: RSA, rsa-sha256.selector: s1-202611280900}\n",
        )
        .expect("parse");
        let dkim = &docs.mail_domains[0].spec.dkim;
        assert_eq!(dkim.rotate_after, Some(Duration::from_secs(90 * 24 * 3600)));
        assert_eq!(dkim.rotation_grace, Some(Duration::from_secs(12 * 3600)));
        let r = Resources::from_documents(docs).expect("resolve");
        let d = r.domain("default/d").expect("domain");
        assert_eq!(d.keys[0].selector, "s1-202611280900");
    }

    #[test]
    fn secret_value_that_is_not_utf8_is_refused_in_files_mode() {
        let mut docs = Documents::default();
        // base64 of the single byte 0xff.
        let err = docs
            .add_yaml(
                Path::new("t.yaml"),
                "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\ndata: {password: /w==}\n",
            )
            .expect_err("refused");
        assert!(
            err.to_string().contains("Secret s: password is not UTF-8"),
            "{err}"
        );
    }

    #[test]
    fn return_path_hosts_are_known() {
        let mut docs = Documents::default();
        docs.add_yaml(
            Path::new("t.yaml"),
            "apiVersion: herald.dev/v1alpha1\nkind: MailDomain\nmetadata: {name: d}\n\
             spec: {domain: d.test, returnPath: Bounces.D.test}\n",
        )
        .expect("parse");
        let r = Resources::from_documents(docs).expect("resolve");
        let host = Domain::parse("bounces.d.test").expect("domain");
        assert_eq!(
            r.domain("default/d").and_then(|d| d.return_path.clone()),
            Some(host.clone())
        );
        assert!(r.is_return_path_host(&host));
        assert!(!r.is_return_path_host(&Domain::parse("d.test").expect("domain")));
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
