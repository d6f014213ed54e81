//! Herald's configuration: one YAML file (every role reads its own section), every key
//! overridable from the environment, defaults that run on a laptop.
//!
//! Environment overrides: `HERALD_<SECTION>__<KEY>[__<KEY>...]=value`, e.g.
//! `HERALD_NATS__URL=nats://nats:4222` or `HERALD_DELIVERY__DNS__NAMESERVERS=[10.0.0.10:53]`.
//! Values are parsed as YAML scalars or flow collections.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};
use serde_yaml::{Mapping, Value};

use crate::Error;

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub nats: NatsConfig,
    pub resources: ResourcesConfig,
    pub ingress: IngressConfig,
    pub delivery: DeliveryConfig,
    pub sink: SinkConfig,
    pub admin: AdminConfig,
    pub api: ApiConfig,
    pub bounces: BouncesConfig,
}

/// Return paths (VERP) and inbound bounces: read by delivery, which writes the return path,
/// and by ingress, which takes the bounces back. Both must see the same secret.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BouncesConfig {
    /// Key of the HMAC that tags every return-path address (`b+<queue id>-<tag>@<host>`),
    /// so that nobody who has not seen a message can forge a bounce for it. Unset: no tag,
    /// and anyone can make a valid return-path address from a queue id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// How long after `nats.queue_lifetime` a bounce can still be matched to its message
    /// (remote servers bounce up to their own queue lifetime after accepting).
    #[serde(with = "humantime_serde")]
    pub record_grace: Duration,
}

/// Shortest secret accepted: a tag is only as strong as its key.
pub const MIN_BOUNCE_SECRET_LEN: usize = 16;

impl Default for BouncesConfig {
    fn default() -> Self {
        BouncesConfig {
            secret: None,
            record_grace: Duration::from_secs(3 * 24 * 3600),
        }
    }
}

// By hand: the secret must never reach a log line.
impl std::fmt::Debug for BouncesConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BouncesConfig")
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("record_grace", &self.record_grace)
            .finish()
    }
}

impl BouncesConfig {
    pub fn validate(&self) -> Result<(), Error> {
        match &self.secret {
            Some(s) if s.len() < MIN_BOUNCE_SECRET_LEN => Err(Error::Config(format!(
                "bounces.secret must have at least {MIN_BOUNCE_SECRET_LEN} characters"
            ))),
            _ => Ok(()),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the HTTP endpoint for `/healthz`, `/readyz` and Prometheus `/metrics`;
    /// off when unset.
    pub addr: Option<SocketAddr>,
}

/// `herald api`: the reports API (gRPC and JSON over HTTP) read from JetStream.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// gRPC listen address (service `herald.v1.Reports`).
    pub grpc_addr: SocketAddr,
    /// JSON-over-HTTP listen address (`/v1/...`).
    pub http_addr: SocketAddr,
    /// Bearer token every request must carry (`Authorization: Bearer <token>`).
    #[serde(serialize_with = "redacted")]
    pub token: Option<String>,
    /// File holding the token (a mounted Secret); read at start, surrounding whitespace
    /// ignored. Used when `token` is unset.
    pub token_file: Option<PathBuf>,
    /// Serve without a token on non-loopback addresses. Off: without a token the API
    /// refuses to start unless both addresses are loopback.
    pub allow_unauthenticated: bool,
    /// Most events one request may read from the events stream; a longer scan answers
    /// with what it found, marked incomplete.
    pub max_scan: usize,
    /// How far back a lookup by Message-ID header (rather than queue id) searches.
    #[serde(with = "humantime_serde")]
    pub message_id_lookback: Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            token: None,
            token_file: None,
            allow_unauthenticated: false,
            max_scan: 100_000,
            message_id_lookback: Duration::from_secs(24 * 3600),
        }
    }
}

// By hand: the token must never reach a log line.
impl std::fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiConfig")
            .field("grpc_addr", &self.grpc_addr)
            .field("http_addr", &self.http_addr)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .field("allow_unauthenticated", &self.allow_unauthenticated)
            .field("max_scan", &self.max_scan)
            .field("message_id_lookback", &self.message_id_lookback)
            .finish()
    }
}

/// A secret printed (`herald config`) as a placeholder: set or not, never its value.
fn redacted<S: serde::Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_some("<redacted>"),
        None => s.serialize_none(),
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// NATS server URL(s), comma separated.
    pub url: String,
    /// Optional `.creds` file (NATS decentralised auth).
    pub credentials: Option<PathBuf>,
    /// Replicas of every stream and bucket: 1 for a single server, 3 in production.
    pub replicas: usize,
    /// Longest time a message may stay queued; bodies and entries expire after it.
    #[serde(with = "humantime_serde")]
    pub queue_lifetime: Duration,
    /// Window in which a re-submitted identical message is recognised as a duplicate.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// How long events are retained for reports and the API.
    #[serde(with = "humantime_serde")]
    pub events_retention: Duration,
    /// Time allowed for JetStream to acknowledge a publish before ingress answers 451.
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".into(),
            credentials: None,
            replicas: 1,
            queue_lifetime: Duration::from_secs(5 * 24 * 3600),
            duplicate_window: Duration::from_secs(120),
            events_retention: Duration::from_secs(30 * 24 * 3600),
            publish_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResourcesConfig {
    /// Where MailDomains, SmtpAccounts and their Secrets come from: `files` (the directory
    /// `dir`) or `kubernetes` (watched in `namespace`).
    pub source: ResourceSourceKind,
    /// Files mode: a directory of MailDomain, SmtpAccount and Secret YAML documents.
    pub dir: PathBuf,
    /// Files mode: how often the directory is re-read for changes.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
    /// Kubernetes mode: the namespace whose resources are watched. Empty (the default): the
    /// pod's own namespace (`POD_NAMESPACE`, else the service account's or kubeconfig's).
    pub namespace: String,
}

/// The implementation of the resource source a role reads through.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ResourceSourceKind {
    /// A directory of YAML documents, re-read every `reload_interval`.
    #[default]
    Files,
    /// The Kubernetes API: MailDomains, SmtpAccounts and labelled Secrets, watched.
    Kubernetes,
}

impl Default for ResourcesConfig {
    fn default() -> Self {
        ResourcesConfig {
            source: ResourceSourceKind::Files,
            dir: PathBuf::from("examples"),
            reload_interval: Duration::from_secs(5),
            namespace: String::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerTls {
    /// No TLS offered (only for trusted networks).
    None,
    /// STARTTLS offered (submission, port 587).
    Starttls,
    /// TLS from the first byte (submissions, port 465).
    Implicit,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub name: String,
    pub addr: SocketAddr,
    pub tls: ListenerTls,
    /// Allow AUTH before TLS. Off by default: passwords never cross the wire in clear.
    #[serde(default)]
    pub allow_plaintext_auth: bool,
    /// Takes bounces instead of submissions (the MX of the MailDomains' return-path hosts,
    /// port 25): no AUTH; only return-path addresses whose tag verifies are accepted.
    #[serde(default)]
    pub inbound: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngressConfig {
    /// Name in the greeting, EHLO reply and Received headers.
    pub hostname: String,
    /// Certificate for STARTTLS and implicit TLS listeners.
    pub tls: Option<TlsFiles>,
    pub listeners: Vec<ListenerConfig>,
    /// Largest message accepted, in octets (advertised in EHLO SIZE).
    pub max_message_size: usize,
    /// Most recipients in one transaction.
    pub max_recipients: usize,
    /// Idle time allowed between commands (RFC 5321 4.5.3.2: at least 5 minutes).
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Idle time allowed while receiving DATA (RFC 5321: 3 min per block; 10 min for the end).
    #[serde(with = "humantime_serde")]
    pub data_timeout: Duration,
    /// Time an ingress pod keeps open sessions after SIGTERM before closing them.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Concurrent connections one pod accepts in all (`421 4.7.0` beyond).
    pub max_connections: usize,
    /// Concurrent connections one pod accepts from one client IP (`421 4.7.0` beyond).
    pub max_connections_per_ip: usize,
    /// Failed AUTH attempts from one IP, counted across all pods, before it is blocked.
    pub max_auth_failures: u64,
    /// How long failed AUTH attempts are remembered (and an IP stays blocked) after the last.
    #[serde(with = "humantime_serde")]
    pub auth_failure_window: Duration,
    /// Longest line in a message, CRLF excluded (RFC 5322 2.1.1: 998).
    pub max_line_length: usize,
    /// A bare CR or LF in a message: `reject` (550 5.5.2, the default: it is how SMTP
    /// smuggling starts) or `normalize` (rewritten to CRLF).
    pub bare_line_endings: BareLineEndings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BareLineEndings {
    Reject,
    Normalize,
}

impl Default for IngressConfig {
    fn default() -> Self {
        IngressConfig {
            hostname: "localhost".into(),
            tls: None,
            listeners: vec![
                ListenerConfig {
                    name: "submission".into(),
                    addr: SocketAddr::from(([127, 0, 0, 1], 2587)),
                    tls: ListenerTls::Starttls,
                    allow_plaintext_auth: false,
                    inbound: false,
                },
                ListenerConfig {
                    name: "submissions".into(),
                    addr: SocketAddr::from(([127, 0, 0, 1], 2465)),
                    tls: ListenerTls::Implicit,
                    allow_plaintext_auth: false,
                    inbound: false,
                },
            ],
            max_message_size: 25 * 1024 * 1024,
            max_recipients: 100,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(600),
            drain_timeout: Duration::from_secs(30),
            max_connections: 1000,
            max_connections_per_ip: 10,
            max_auth_failures: 5,
            auth_failure_window: Duration::from_secs(600),
            max_line_length: 998,
            bare_line_endings: BareLineEndings::Reject,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Nameservers asked for MX/A/AAAA. Explicit: the system resolver is never used.
    pub nameservers: Vec<SocketAddr>,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            nameservers: vec![SocketAddr::from(([127, 0, 0, 1], 53))],
            timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Delay before the first retry after a temporary failure.
    #[serde(with = "humantime_serde")]
    pub initial: Duration,
    /// Longest delay between retries (the delay doubles up to this).
    #[serde(with = "humantime_serde")]
    pub max: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial: Duration::from_secs(300),
            max: Duration::from_secs(4 * 3600),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// EHLO name presented to remote MX hosts (should match the source IP's reverse DNS).
    pub hostname: String,
    pub dns: DnsConfig,
    /// TCP port of remote MX hosts.
    pub smtp_port: u16,
    /// Send every message to this host instead of the recipients' MX (a smarthost, or the
    /// local sink in `herald dev`).
    pub relay_host: Option<SocketAddr>,
    /// Queue entries handled at once by one worker.
    pub concurrency: usize,
    /// Refuse to deliver without TLS (otherwise STARTTLS is opportunistic).
    pub require_tls: bool,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time allowed for each reply of the remote server (RFC 5321 4.5.3.2 minimums apply
    /// to the DATA end: 10 minutes).
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    pub retry: RetryConfig,
    /// JetStream ack wait for an entry in progress; workers extend it while delivering.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// How long a hard-bounced recipient stays on its account's suppression list.
    #[serde(with = "humantime_serde")]
    pub suppression_ttl: Duration,
    /// Send the sender a "delayed" DSN (RFC 3464, once per message and domain) when mail is
    /// still undelivered this long after it was accepted. Off when unset.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub delay_warning: Option<Duration>,
    /// Local addresses mail leaves from. Empty: one source, the address the OS picks.
    pub sources: Vec<crate::egress::SourceConfig>,
    /// Named, weighted sets of sources; a MailDomain or SmtpAccount picks one by name.
    pub pools: std::collections::BTreeMap<String, Vec<crate::egress::PoolMember>>,
    /// Pool for mail whose MailDomain and SmtpAccount name none. Empty: every source.
    pub default_pool: String,
    pub warmup: crate::egress::WarmupConfig,
    pub shaping: crate::egress::ShapingConfig,
}

impl DeliveryConfig {
    /// Checks what serde cannot: pools name defined sources, rules compile.
    pub fn validate(&self) -> Result<(), Error> {
        crate::egress::validate(
            &self.sources,
            &self.pools,
            &self.default_pool,
            &self.shaping,
        )
        .map_err(Error::Config)
    }
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            hostname: "localhost".into(),
            dns: DnsConfig::default(),
            smtp_port: 25,
            relay_host: None,
            concurrency: 16,
            require_tls: false,
            connect_timeout: Duration::from_secs(30),
            command_timeout: Duration::from_secs(300),
            retry: RetryConfig::default(),
            ack_wait: Duration::from_secs(60),
            suppression_ttl: Duration::from_secs(30 * 24 * 3600),
            delay_warning: None,
            sources: Vec::new(),
            pools: Default::default(),
            default_pool: String::new(),
            warmup: Default::default(),
            shaping: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SinkConfig {
    pub addr: SocketAddr,
    /// Maildir (created if missing) where every accepted message is stored.
    pub maildir: PathBuf,
    pub hostname: String,
    /// Offer STARTTLS with this certificate.
    pub tls: Option<TlsFiles>,
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 2525)),
            maildir: PathBuf::from(".dev/maildir"),
            hostname: "sink.localhost".into(),
            tls: None,
        }
    }
}

impl Config {
    /// Reads `path` (when given) and applies `HERALD_...` environment overrides.
    pub fn load(path: Option<&std::path::Path>) -> Result<Config, Error> {
        let mut root = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| Error::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                serde_yaml::from_str::<Value>(&text)
                    .map_err(|e| Error::Config(format!("{}: {e}", p.display())))?
            }
            None => Value::Mapping(Mapping::new()),
        };
        if root.is_null() {
            root = Value::Mapping(Mapping::new());
        }
        apply_env(&mut root, std::env::vars())?;
        let config: Config =
            serde_yaml::from_value(root).map_err(|e| Error::Config(e.to_string()))?;
        config.delivery.validate()?;
        config.bounces.validate()?;
        Ok(config)
    }
}

/// Applies `HERALD_A__B=value` as `a: {b: value}` on top of the file's values.
fn apply_env(root: &mut Value, vars: impl Iterator<Item = (String, String)>) -> Result<(), Error> {
    for (name, raw) in vars {
        let Some(path) = name.strip_prefix("HERALD_") else {
            continue;
        };
        // HERALD_CONFIG names the file itself, HERALD_BIN / HERALD_E2E_* belong to tests.
        if !path.contains("__") {
            continue;
        }
        let keys: Vec<String> = path.split("__").map(|k| k.to_lowercase()).collect();
        let value: Value = serde_yaml::from_str(&raw).unwrap_or(Value::String(raw.clone()));
        let mut node = &mut *root;
        for (i, key) in keys.iter().enumerate() {
            let Value::Mapping(map) = node else {
                return Err(Error::Config(format!(
                    "{name}: {} is not a section",
                    keys[..i].join(".")
                )));
            };
            let k = Value::String(key.clone());
            if i + 1 == keys.len() {
                map.insert(k, value.clone());
                break;
            }
            node = map
                .entry(k)
                .or_insert_with(|| Value::Mapping(Mapping::new()));
            if node.is_null() {
                *node = Value::Mapping(Mapping::new());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_run_on_a_laptop() {
        let c: Config = serde_yaml::from_str("{}").expect("empty config");
        assert_eq!(c.nats.url, "nats://127.0.0.1:4222");
        assert_eq!(c.ingress.listeners.len(), 2);
        assert_eq!(c.delivery.smtp_port, 25);
        assert_eq!(c.delivery.retry.initial, Duration::from_secs(300));
    }

    #[test]
    fn environment_overrides_nested_keys() {
        let mut root: Value = serde_yaml::from_str("nats: {url: nats://a:1}").expect("yaml");
        apply_env(
            &mut root,
            [
                ("HERALD_NATS__URL".to_string(), "nats://b:2".to_string()),
                (
                    "HERALD_DELIVERY__DNS__NAMESERVERS".to_string(),
                    "[127.0.0.1:5353]".to_string(),
                ),
                (
                    "HERALD_DELIVERY__RETRY__INITIAL".to_string(),
                    "2s".to_string(),
                ),
                ("HERALD_CONFIG".to_string(), "ignored.yaml".to_string()),
            ]
            .into_iter(),
        )
        .expect("apply");
        let c: Config = serde_yaml::from_value(root).expect("config");
        assert_eq!(c.nats.url, "nats://b:2");
        assert_eq!(
            c.delivery.dns.nameservers,
            vec!["127.0.0.1:5353".parse::<SocketAddr>().expect("addr")]
        );
        assert_eq!(c.delivery.retry.initial, Duration::from_secs(2));
    }

    fn keys(prefix: &str, v: &Value, out: &mut Vec<String>) {
        if let Value::Mapping(m) = v {
            for (k, v) in m {
                let k = format!("{prefix}{}", k.as_str().unwrap_or_default());
                match v {
                    Value::Mapping(_) => keys(&format!("{k}."), v, out),
                    _ => out.push(k),
                }
            }
        }
    }

    #[test]
    fn readme_documents_every_config_key() {
        let readme = include_str!("../../../README.md");
        let mut all = Vec::new();
        let value = serde_yaml::to_value(Config::default()).expect("serialize");
        keys("", &value, &mut all);
        // Optional sections absent from the defaults.
        all.extend(
            [
                "ingress.tls.cert",
                "ingress.tls.key",
                "sink.tls.cert",
                "sink.tls.key",
                "nats.credentials",
                "delivery.relay_host",
                "delivery.delay_warning",
                "delivery.sources",
                "delivery.pools",
                "bounces.secret",
            ]
            .map(String::from),
        );
        let missing: Vec<_> = all
            .iter()
            .filter(|k| !readme.contains(&format!("`{k}`")))
            .collect();
        assert!(
            missing.is_empty(),
            "README configuration table lacks {missing:?}"
        );
    }

    #[test]
    fn resource_source_defaults_to_files_and_reads_kubernetes() {
        let c: Config = serde_yaml::from_str("{}").expect("empty config");
        assert_eq!(c.resources.source, ResourceSourceKind::Files);
        assert_eq!(c.resources.namespace, "");
        let c: Config =
            serde_yaml::from_str("resources: {source: kubernetes, namespace: mail}").expect("yaml");
        assert_eq!(c.resources.source, ResourceSourceKind::Kubernetes);
        assert_eq!(c.resources.namespace, "mail");
        assert!(serde_yaml::from_str::<Config>("resources: {source: etcd}").is_err());
    }

    #[test]
    fn bounce_secret_comes_from_the_environment_and_stays_out_of_debug() {
        let mut root = Value::Mapping(Mapping::new());
        apply_env(
            &mut root,
            [(
                "HERALD_BOUNCES__SECRET".to_string(),
                "0123456789abcdef-long-enough".to_string(),
            )]
            .into_iter(),
        )
        .expect("apply");
        let c: Config = serde_yaml::from_value(root).expect("config");
        assert_eq!(
            c.bounces.secret.as_deref(),
            Some("0123456789abcdef-long-enough")
        );
        assert!(c.bounces.validate().is_ok());
        assert!(!format!("{c:?}").contains("0123456789abcdef"));
        let short = BouncesConfig {
            secret: Some("short".into()),
            ..Default::default()
        };
        assert!(short.validate().is_err());
    }

    #[test]
    fn listeners_are_submission_unless_marked_inbound() {
        let c: Config = serde_yaml::from_str(
            "ingress: {listeners: [{name: mx, addr: '127.0.0.1:25', tls: starttls, inbound: true}, \
             {name: sub, addr: '127.0.0.1:587', tls: starttls}]}",
        )
        .expect("yaml");
        assert!(c.ingress.listeners[0].inbound);
        assert!(!c.ingress.listeners[1].inbound);
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(serde_yaml::from_str::<Config>("nats: {ulr: x}").is_err());
    }
}
