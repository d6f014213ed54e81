//! `herald dev`: ingress, delivery, the reports API and a sink in one process, against a
//! local nats-server, with every message routed to the sink's Maildir. For a first look, not for production.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use herald_core::{
    admin::Health,
    config::{Config, ListenerTls, TlsFiles},
    resources::Documents,
};
use tokio::sync::watch;

#[derive(clap::Args)]
pub struct DevArgs {
    /// Where dev mode keeps its TLS certificate and the sink's Maildir.
    #[arg(long, default_value = ".dev")]
    data_dir: PathBuf,
    /// Directory of MailDomain / SmtpAccount / Secret documents.
    #[arg(long, default_value = "examples")]
    resources: PathBuf,
}

/// A self-signed certificate for `localhost`, made once and kept in the data directory.
fn dev_certificate(dir: &Path) -> anyhow::Result<TlsFiles> {
    let cert = dir.join("tls/cert.pem");
    let key = dir.join("tls/key.pem");
    if !cert.exists() || !key.exists() {
        std::fs::create_dir_all(dir.join("tls"))?;
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
            .context("generating a self-signed certificate")?;
        std::fs::write(&cert, ck.cert.pem())?;
        std::fs::write(&key, ck.signing_key.serialize_pem())?;
    }
    Ok(TlsFiles { cert, key })
}

/// The first account of the resource directory and its password, for the hint we print.
fn first_account(dir: &Path) -> Option<(String, String, String)> {
    let (docs, _) = Documents::read_dir(dir).ok()?;
    let acct = docs.smtp_accounts.first()?;
    let ns = acct
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let r = &acct.spec.password_secret;
    let password = docs
        .secrets
        .get(&format!("{ns}/{}", r.name))
        .and_then(|d| d.get(&r.key))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.starts_with("$argon2"))
        .unwrap_or_else(|| "<password>".into());
    let domain = acct
        .spec
        .allowed_domains
        .first()
        .and_then(|name| {
            docs.mail_domains
                .iter()
                .find(|d| d.metadata.name.as_deref() == Some(name))
        })
        .map(|d| d.spec.domain.clone())
        .unwrap_or_else(|| "example.test".into());
    Some((
        acct.metadata.name.clone().unwrap_or_default(),
        password,
        domain,
    ))
}

/// Dev mode's configuration: the file (if any) plus dev defaults: a self-signed
/// certificate, the example resources, and every message routed to the sink.
pub fn config(args: &DevArgs, config_path: Option<&Path>) -> anyhow::Result<Config> {
    let mut config = Config::load(config_path).context("reading configuration")?;
    if config.ingress.tls.is_none() {
        config.ingress.tls = Some(dev_certificate(&args.data_dir)?);
    }
    config.resources.dir = args.resources.clone();
    config.sink.maildir = args.data_dir.join("maildir");
    if config.delivery.relay_host.is_none() {
        config.delivery.relay_host = Some(config.sink.addr);
    }
    Ok(config)
}

pub async fn run(
    args: DevArgs,
    config: Config,
    shutdown: watch::Receiver<bool>,
    health: Arc<Health>,
) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let Some(resources) = crate::resources(&config, &shutdown).await? else {
        return Ok(());
    };
    let api_auth = herald_api::Auth::from_config(&config.api)?;
    let queue = crate::connect_queue(&config).await?;

    let sink = tokio::spawn(herald_sink::serve(config.sink.clone(), shutdown.clone()));
    let api = tokio::spawn(herald_api::run(
        config.clone(),
        api_auth,
        queue.clone(),
        shutdown.clone(),
        herald_core::admin::Health::new(),
    ));
    // Dev mode is ready when ingress is: one health for the whole process.
    let ingress = tokio::spawn(herald_ingress::serve(
        config.clone(),
        resources.clone(),
        queue.clone(),
        shutdown.clone(),
        health,
    ));
    let delivery = tokio::spawn(herald_delivery::run(
        config.clone(),
        resources,
        queue,
        shutdown,
        herald_core::admin::Health::new(),
    ));

    let submission = config
        .ingress
        .listeners
        .iter()
        .find(|l| l.tls == ListenerTls::Starttls)
        .or(config.ingress.listeners.first());
    if let (Some(l), Some((user, password, domain))) = (submission, first_account(&args.resources))
    {
        let tls = match l.tls {
            ListenerTls::Starttls => " --tls",
            ListenerTls::Implicit => " --tls-on-connect",
            ListenerTls::None => "",
        };
        eprintln!(
            "\nHerald dev is running. Send a first message:\n\n  swaks --server {ip} --port {port}{tls} --auth PLAIN --auth-user {user} --auth-password '{password}' --from hello@{domain} --to you@example.net\n\nEvery message is delivered, DKIM-signed, to the local sink: {maildir}/new/\nFollow it with the reports API: curl http://{api}/v1/messages/<queue id>\nStop with Ctrl-C.\n",
            ip = l.addr.ip(),
            port = l.addr.port(),
            maildir = config.sink.maildir.display(),
            api = config.api.http_addr,
        );
    }

    // Each role drains on the shutdown signal; if one fails, dev mode stops as a whole.
    let (sink, ingress, delivery, api) = (
        async { sink.await?.map_err(anyhow::Error::from) },
        async { ingress.await?.map_err(anyhow::Error::from) },
        async { delivery.await?.map_err(anyhow::Error::from) },
        async { api.await?.map_err(anyhow::Error::from) },
    );
    tokio::try_join!(sink, ingress, delivery, api)?;
    Ok(())
}
