//! A small relay world for scenarios that look at one sending path: nats-server, dnsmasq,
//! one Postfix MX for `example.test` (DKIM key published), and `herald ingress` plus
//! `herald delivery` as separate processes. Herald settings beyond the defaults come in as
//! `HERALD_...` environment overrides, exactly as an operator would set them.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use crate::{
    DeliveryConfig, DkimAlgorithm, DkimKey, Dns, DnsRecords, Herald, HeraldConfig, IngressConfig,
    Listener, Nats, Postfix, Resources, Role, Scenario, Swaks, TlsMode, self_signed_cert,
    wait_until,
};

/// The account every World sets up.
pub const WORLD_ACCOUNT: &str = "app";
pub const WORLD_PASSWORD: &str = "s3cret";

/// How a [`World`] differs from the default one.
#[derive(Default, Clone)]
pub struct WorldOptions {
    pub ingress_env: Vec<(String, String)>,
    pub delivery_env: Vec<(String, String)>,
    /// Ingress listens without TLS and allows AUTH in clear.
    pub plaintext: bool,
    /// YAML mapping merged into the account's spec (e.g. `{hourlyLimit: 10}`).
    pub account_spec: Option<String>,
    /// More resource documents (YAML), e.g. a Secret the account refers to.
    pub extra_documents: Vec<String>,
    /// YAML mapping deep-merged into the config file's `delivery:` section.
    pub delivery_extra: Option<serde_yaml::Value>,
}

pub struct World {
    pub ingress: Herald,
    pub delivery: Herald,
    pub mx: Postfix,
    pub dns: Dns,
    pub nats: Nats,
    /// The STARTTLS submission listener.
    pub submission: SocketAddr,
    pub config: PathBuf,
    pub scenario: Scenario,
}

impl World {
    /// Same extra environment for both processes.
    pub fn start(name: &str, env: &[(String, String)]) -> World {
        World::start_split_env(name, env, env)
    }

    /// Extra environment for ingress and for delivery separately.
    pub fn start_split_env(
        name: &str,
        ingress_env: &[(String, String)],
        delivery_env: &[(String, String)],
    ) -> World {
        World::start_with(
            name,
            WorldOptions {
                ingress_env: ingress_env.to_vec(),
                delivery_env: delivery_env.to_vec(),
                ..Default::default()
            },
        )
    }

    /// Ingress listens without TLS and allows AUTH in clear (for raw-protocol probes);
    /// `submission` is that listener.
    pub fn start_plaintext(name: &str, ingress_env: &[(String, String)]) -> World {
        World::start_with(
            name,
            WorldOptions {
                ingress_env: ingress_env.to_vec(),
                plaintext: true,
                ..Default::default()
            },
        )
    }

    pub fn start_with(name: &str, opts: WorldOptions) -> World {
        let WorldOptions {
            ingress_env,
            delivery_env,
            plaintext,
            account_spec,
            extra_documents,
            delivery_extra,
        } = opts;
        let (ingress_env, delivery_env) = (&ingress_env[..], &delivery_env[..]);
        let scenario = Scenario::new(name);
        let nats = Nats::start(&scenario);
        let mx = Postfix::start(&scenario, "example");
        let key = DkimKey::rsa(2048);
        let dns = Dns::start(
            &scenario,
            &DnsRecords::new()
                .mx("example.test", "mx1.example.test", 10)
                .a("mx1.example.test", mx.ip())
                .txt("herald._domainkey.example.test", &key.dns_txt),
        );
        let resources = scenario.subdir("resources");
        let mut docs = Resources::new();
        docs.signing_domain(
            "example-test",
            "example.test",
            "herald",
            DkimAlgorithm::RsaSha256,
            Some(&key),
            None,
        )
        .account_with_password(WORLD_ACCOUNT, WORLD_PASSWORD, &["example-test"])
        .account_spec(WORLD_ACCOUNT, account_spec.as_deref().unwrap_or("{}"));
        for doc in &extra_documents {
            docs.document(serde_yaml::from_str(doc).expect("extra document is YAML"));
        }
        docs.write(&resources);
        let (cert, keyfile) = self_signed_cert(&scenario.subdir("tls"));
        let submission = SocketAddr::from((scenario.ip(), 587));
        let mut config = HeraldConfig::new(&nats.url(), &resources);
        config.ingress = Some(IngressConfig {
            hostname: "ingress.herald.test".into(),
            tls: Some((cert, keyfile)),
            listeners: vec![Listener {
                name: "submission".into(),
                addr: submission,
                tls: if plaintext {
                    TlsMode::None
                } else {
                    TlsMode::Starttls
                },
                allow_plaintext_auth: plaintext,
            }],
        });
        config.delivery = Some(DeliveryConfig {
            hostname: "mta.herald.test".into(),
            nameservers: vec![dns.addr()],
            smtp_port: 25,
            retry_initial: Duration::from_secs(2),
            retry_max: Duration::from_secs(4),
            ack_wait: Duration::from_secs(5),
            extra: delivery_extra,
        });
        let config = config.write(&scenario.dir().join("herald.yaml"));
        let ingress = Herald::start_with_env(
            &scenario,
            "ingress",
            Role::Ingress,
            &config,
            Some(submission),
            ingress_env,
        );
        let delivery = Herald::start_with_env(
            &scenario,
            "delivery",
            Role::Delivery,
            &config,
            None,
            delivery_env,
        );
        World {
            ingress,
            delivery,
            mx,
            dns,
            nats,
            submission,
            config,
            scenario,
        }
    }

    /// Another ingress process (another pod) on the same NATS, with a plaintext listener
    /// of its own on a new address; returns it and the listener's address.
    pub fn another_ingress(&self, name: &str, env: &[(String, String)]) -> (Herald, SocketAddr) {
        let addr = SocketAddr::from((self.scenario.ip(), self.scenario.port()));
        let mut env = env.to_vec();
        env.push(plaintext_listener(addr));
        let h = Herald::start_with_env(
            &self.scenario,
            name,
            Role::Ingress,
            &self.config,
            Some(addr),
            &env,
        );
        (h, addr)
    }

    /// swaks with STARTTLS and AUTH as the world's account.
    pub fn app(&self) -> Swaks {
        Swaks::new(self.submission.ip(), self.submission.port())
            .starttls()
            .auth_plain(WORLD_ACCOUNT, WORLD_PASSWORD)
    }

    /// Submits one message marked `marker` and returns its queue id.
    pub fn submit(&self, marker: &str) -> String {
        let out = self
            .app()
            .from("sender@example.test")
            .to("user@example.test")
            .header(&format!("Subject: {marker}"))
            .run();
        let text = out.text();
        text.split("queued as ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_string)
            .unwrap_or_else(|| {
                panic!(
                    "not queued (swaks exit {}):\n{text}\n{}",
                    out.code,
                    self.logs()
                )
            })
    }

    /// Messages at the MX whose text contains `marker`.
    pub fn arrived(&self, marker: &str) -> usize {
        self.mx
            .maildir_messages()
            .iter()
            .filter(|m| String::from_utf8_lossy(m).contains(marker))
            .count()
    }

    pub fn wait_arrival(&self, marker: &str, timeout: Duration) {
        let arrived = wait_until(timeout, Duration::from_millis(100), || {
            (self.arrived(marker) > 0).then_some(())
        });
        assert!(
            arrived.is_some(),
            "message {marker} never arrived\n{}",
            self.logs()
        );
    }

    pub fn logs(&self) -> String {
        format!(
            "--- ingress:\n{}\n--- delivery:\n{}\n--- scenario {}",
            self.ingress.log_tail(),
            self.delivery.log_tail(),
            self.scenario.dir().display()
        )
    }
}

/// `HERALD_INGRESS__LISTENERS` for one listener without TLS that allows AUTH in clear (for
/// raw-protocol probes).
pub fn plaintext_listener(addr: SocketAddr) -> (String, String) {
    (
        "HERALD_INGRESS__LISTENERS".to_string(),
        format!("[{{name: plain, addr: \"{addr}\", tls: none, allow_plaintext_auth: true}}]"),
    )
}
