//! The herald config file (YAML; herald rejects unknown keys, so only these are written).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_yaml::{Mapping, Value};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    None,
    Starttls,
    Implicit,
}

impl TlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::None => "none",
            TlsMode::Starttls => "starttls",
            TlsMode::Implicit => "implicit",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Listener {
    pub name: String,
    pub addr: SocketAddr,
    pub tls: TlsMode,
    pub allow_plaintext_auth: bool,
}

#[derive(Clone, Debug)]
pub struct IngressConfig {
    pub hostname: String,
    /// (certificate PEM path, key PEM path)
    pub tls: Option<(PathBuf, PathBuf)>,
    pub listeners: Vec<Listener>,
}

#[derive(Clone, Debug)]
pub struct DeliveryConfig {
    /// EHLO name.
    pub hostname: String,
    /// `HOST:PORT` of the only nameservers delivery may ask.
    pub nameservers: Vec<String>,
    /// Port of remote MX hosts.
    pub smtp_port: u16,
    /// First redelivery delay after a temporary failure.
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// JetStream ack wait: how soon an entry held by a killed worker comes back.
    pub ack_wait: Duration,
    /// A YAML mapping deep-merged into the written `delivery:` section, for settings the
    /// fields above do not cover (`concurrency`, nested sections): mappings merge key by
    /// key, anything else replaces what is there.
    pub extra: Option<Value>,
}

#[derive(Clone, Debug)]
pub struct SinkConfig {
    pub addr: SocketAddr,
    pub maildir: PathBuf,
}

/// ```yaml
/// nats: {url: nats://127.0.0.1:PORT}
/// resources: {dir: /path/to/resources}
/// ingress: {hostname, tls: {cert, key}, listeners: [{name, addr, tls, allow_plaintext_auth}]}
/// delivery: {hostname, dns: {nameservers: ["127.0.0.1:PORT"]}, smtp_port, retry: {initial, max}, ack_wait}
/// sink: {addr, maildir}
/// ```
/// Sections left `None` are not written; `delivery` gets [`DeliveryConfig::extra`] merged in.
#[derive(Clone, Debug)]
pub struct HeraldConfig {
    pub nats_url: String,
    pub resources_dir: PathBuf,
    pub ingress: Option<IngressConfig>,
    pub delivery: Option<DeliveryConfig>,
    pub sink: Option<SinkConfig>,
}

impl HeraldConfig {
    pub fn new(nats_url: &str, resources_dir: &Path) -> HeraldConfig {
        HeraldConfig {
            nats_url: nats_url.to_string(),
            resources_dir: resources_dir.to_path_buf(),
            ingress: None,
            delivery: None,
            sink: None,
        }
    }

    pub fn to_yaml(&self) -> String {
        let mut root = Mapping::new();
        root.insert(s("nats"), map([("url", s(&self.nats_url))]));
        root.insert(s("resources"), map([("dir", path(&self.resources_dir))]));
        if let Some(ingress) = &self.ingress {
            let mut m = Mapping::new();
            m.insert(s("hostname"), s(&ingress.hostname));
            if let Some((cert, key)) = &ingress.tls {
                m.insert(s("tls"), map([("cert", path(cert)), ("key", path(key))]));
            }
            let listeners = ingress
                .listeners
                .iter()
                .map(|l| {
                    map([
                        ("name", s(&l.name)),
                        ("addr", s(&l.addr.to_string())),
                        ("tls", s(l.tls.as_str())),
                        ("allow_plaintext_auth", Value::Bool(l.allow_plaintext_auth)),
                    ])
                })
                .collect();
            m.insert(s("listeners"), Value::Sequence(listeners));
            root.insert(s("ingress"), Value::Mapping(m));
        }
        if let Some(d) = &self.delivery {
            let mut delivery = map([
                ("hostname", s(&d.hostname)),
                (
                    "dns",
                    map([(
                        "nameservers",
                        Value::Sequence(d.nameservers.iter().map(|n| s(n)).collect()),
                    )]),
                ),
                ("smtp_port", Value::Number(d.smtp_port.into())),
                (
                    "retry",
                    map([
                        ("initial", s(&humantime(d.retry_initial))),
                        ("max", s(&humantime(d.retry_max))),
                    ]),
                ),
                ("ack_wait", s(&humantime(d.ack_wait))),
            ]);
            if let Some(extra) = &d.extra {
                deep_merge(&mut delivery, extra.clone());
            }
            root.insert(s("delivery"), delivery);
        }
        if let Some(sink) = &self.sink {
            root.insert(
                s("sink"),
                map([
                    ("addr", s(&sink.addr.to_string())),
                    ("maildir", path(&sink.maildir)),
                ]),
            );
        }
        serde_yaml::to_string(&Value::Mapping(root)).expect("a YAML mapping serializes")
    }

    /// Writes the YAML to `path` and returns `path`.
    pub fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.to_yaml())
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path.to_path_buf()
    }
}

fn s(v: &str) -> Value {
    Value::String(v.to_string())
}

fn path(p: &Path) -> Value {
    Value::String(p.display().to_string())
}

fn map<const N: usize>(entries: [(&str, Value); N]) -> Value {
    let mut m = Mapping::new();
    for (k, v) in entries {
        m.insert(s(k), v);
    }
    Value::Mapping(m)
}

/// Merges `overlay` into `base`: mappings key by key (recursively), anything else
/// (scalars, sequences, a mapping over a scalar) replaces the value in `base`.
fn deep_merge(base: &mut Value, overlay: Value) {
    match (base, overlay) {
        (Value::Mapping(base), Value::Mapping(overlay)) => {
            for (k, v) in overlay {
                match base.get_mut(&k) {
                    Some(existing) => deep_merge(existing, v),
                    None => {
                        base.insert(k, v);
                    }
                }
            }
        }
        (base, overlay) => *base = overlay,
    }
}

/// `2s`, `1500ms`: what humantime parses.
fn humantime(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_has_the_documented_shape() {
        let mut c = HeraldConfig::new("nats://127.0.0.1:4222", Path::new("/r"));
        c.ingress = Some(IngressConfig {
            hostname: "ingress.herald.test".into(),
            tls: Some(("/c.pem".into(), "/k.pem".into())),
            listeners: vec![Listener {
                name: "submission".into(),
                addr: "127.1.2.3:587".parse().expect("addr"),
                tls: TlsMode::Starttls,
                allow_plaintext_auth: false,
            }],
        });
        c.delivery = Some(DeliveryConfig {
            hostname: "mta.herald.test".into(),
            nameservers: vec!["127.0.0.1:5353".into()],
            smtp_port: 25,
            retry_initial: Duration::from_secs(2),
            retry_max: Duration::from_millis(10_500),
            ack_wait: Duration::from_secs(5),
            extra: None,
        });
        let v: Value = serde_yaml::from_str(&c.to_yaml()).expect("parses");
        assert_eq!(v["nats"]["url"], s("nats://127.0.0.1:4222"));
        assert_eq!(v["resources"]["dir"], s("/r"));
        assert_eq!(v["ingress"]["tls"]["key"], s("/k.pem"));
        assert_eq!(v["ingress"]["listeners"][0]["addr"], s("127.1.2.3:587"));
        assert_eq!(v["ingress"]["listeners"][0]["tls"], s("starttls"));
        assert_eq!(
            v["ingress"]["listeners"][0]["allow_plaintext_auth"],
            Value::Bool(false)
        );
        assert_eq!(v["delivery"]["dns"]["nameservers"][0], s("127.0.0.1:5353"));
        assert_eq!(v["delivery"]["smtp_port"], Value::Number(25.into()));
        assert_eq!(v["delivery"]["retry"]["initial"], s("2s"));
        assert_eq!(v["delivery"]["retry"]["max"], s("10500ms"));
        assert!(v.get("sink").is_none());
    }

    #[test]
    fn delivery_extra_is_deep_merged() {
        let mut c = HeraldConfig::new("nats://127.0.0.1:4222", Path::new("/r"));
        c.delivery = Some(DeliveryConfig {
            hostname: "mta.herald.test".into(),
            nameservers: vec!["127.0.0.1:5353".into()],
            smtp_port: 25,
            retry_initial: Duration::from_secs(2),
            retry_max: Duration::from_secs(4),
            ack_wait: Duration::from_secs(5),
            extra: Some(
                serde_yaml::from_str(
                    "{concurrency: 8, smtp_port: 2525, retry: {max: 9s}, \
                     dns: {nameservers: ['127.0.0.1:53']}, \
                     pools: {default: {sources: [127.0.0.9]}}}",
                )
                .expect("extra is YAML"),
            ),
        });
        let v: Value = serde_yaml::from_str(&c.to_yaml()).expect("parses");
        let d = &v["delivery"];
        assert_eq!(d["concurrency"], Value::Number(8.into()));
        assert_eq!(
            d["smtp_port"],
            Value::Number(2525.into()),
            "a scalar replaces"
        );
        assert_eq!(d["retry"]["max"], s("9s"), "nested keys are replaced...");
        assert_eq!(d["retry"]["initial"], s("2s"), "...and their siblings kept");
        assert_eq!(
            d["dns"]["nameservers"],
            Value::Sequence(vec![s("127.0.0.1:53")]),
            "a sequence replaces, it is not appended to"
        );
        assert_eq!(d["pools"]["default"]["sources"][0], s("127.0.0.9"));
        assert_eq!(d["hostname"], s("mta.herald.test"));
        assert_eq!(d["ack_wait"], s("5s"));
    }
}
