//! `herald`: one binary, one subcommand per role.

mod dev;

use std::{path::PathBuf, sync::Arc};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use herald_core::{
    admin::{self, Health},
    config::{Config, ResourceSourceKind},
    queue::{self, Queue},
    resources::{FileSource, KubeSource, ResourceSource},
    telemetry,
};
use tokio::sync::watch;

#[derive(Parser)]
#[command(
    name = "herald",
    version,
    about = "Kubernetes-native outbound mail relay"
)]
struct Cli {
    /// Configuration file (YAML). Every key can be overridden with HERALD_<SECTION>__<KEY>.
    #[arg(short, long, env = "HERALD_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// SMTP submission server: authenticates apps and queues their mail in JetStream.
    Ingress,
    /// Delivery worker: JetStream queue to the recipients' MX hosts, DKIM-signed.
    Delivery,
    /// Receiving SMTP server that stores every message in a Maildir (tests, dev, benchmarks).
    Sink,
    /// Reports API over gRPC and JSON HTTP: message history, account statistics,
    /// suppressions, queue state.
    Api,
    /// All in one process: ingress, delivery, the reports API and a sink that receives all
    /// mail.
    Dev(dev::DevArgs),
    /// Print the MailDomain and SmtpAccount CustomResourceDefinitions.
    Crds,
    /// Kubernetes operator: DKIM key Secrets, DNS verification and status of MailDomains.
    Operator(herald_operator::cli::OperatorArgs),
    /// MailDomains outside Kubernetes: `herald domain check FILE`.
    #[command(subcommand)]
    Domain(herald_operator::cli::DomainCommand),
    /// Print an Argon2 hash of a password read from stdin, for an SmtpAccount's Secret.
    HashPassword,
    /// Print the queue's state as JSON.
    Status,
    /// Check the configuration (file plus HERALD_... overrides) and print it in full, as
    /// every role would run with it.
    Config,
}

/// Turns SIGTERM / Ctrl-C into the shutdown signal every role drains on.
fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutdown requested: draining");
        let _ = tx.send(true);
    });
    rx
}

/// Telemetry for `service`, and the admin endpoint (`/healthz`, `/readyz`, `/metrics`)
/// when `admin.addr` is configured.
fn observe(
    service: &str,
    config: &Config,
    shutdown: &watch::Receiver<bool>,
) -> (telemetry::Telemetry, Arc<Health>) {
    let telemetry = telemetry::init(service, config.admin.addr.is_some());
    let health = Health::new();
    if let Some(addr) = config.admin.addr {
        let serve = admin::serve(
            addr,
            health.clone(),
            telemetry.prometheus_registry(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "admin endpoint stopped");
            }
        });
    }
    (telemetry, health)
}

async fn connect_queue(config: &Config) -> anyhow::Result<Queue> {
    let client = queue::connect(&config.nats)
        .await
        .with_context(|| format!("connecting to NATS at {}", config.nats.url))?;
    Queue::setup(client, &config.nats)
        .await
        .context("setting up JetStream streams")
}

/// The resource source `resources.source` names. In Kubernetes mode this returns only once
/// every watcher has listed, so a role reports ready (`/readyz`) with a full view and never
/// refuses mail for an account it has not seen yet; `None` when shutdown comes first.
async fn resources(
    config: &Config,
    shutdown: &watch::Receiver<bool>,
) -> anyhow::Result<Option<Arc<dyn ResourceSource>>> {
    match config.resources.source {
        ResourceSourceKind::Files => {
            let source = FileSource::start(
                config.resources.dir.clone(),
                config.resources.reload_interval,
            )
            .with_context(|| {
                format!("loading resources from {}", config.resources.dir.display())
            })?;
            Ok(Some(source))
        }
        ResourceSourceKind::Kubernetes => {
            let source = KubeSource::connect(&config.resources)
                .await
                .context("connecting to the Kubernetes API")?;
            tracing::info!(
                namespace = source.namespace(),
                "waiting for the first sync of MailDomains, SmtpAccounts and Secrets"
            );
            let mut shutdown = shutdown.clone();
            let stop = async move {
                // A closed channel means no signal can come any more: keep waiting for sync.
                if shutdown.wait_for(|&stop| stop).await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                () = source.wait_ready() => {
                    tracing::info!(namespace = source.namespace(), "resources synced");
                    Ok(Some(source))
                }
                () = stop => Ok(None),
            }
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let load = || Config::load(cli.config.as_deref()).context("reading configuration");
    match cli.command {
        Command::Ingress => {
            let config = Arc::new(load()?);
            let shutdown = shutdown_signal();
            let (_telemetry, health) = observe("herald-ingress", &config, &shutdown);
            let Some(resources) = resources(&config, &shutdown).await? else {
                return Ok(());
            };
            let queue = connect_queue(&config).await?;
            herald_ingress::serve(config, resources, queue, shutdown, health).await?;
        }
        Command::Delivery => {
            let config = Arc::new(load()?);
            let shutdown = shutdown_signal();
            let (_telemetry, health) = observe("herald-delivery", &config, &shutdown);
            let Some(resources) = resources(&config, &shutdown).await? else {
                return Ok(());
            };
            let queue = connect_queue(&config).await?;
            herald_delivery::run(config, resources, queue, shutdown, health).await?;
        }
        Command::Sink => {
            let config = load()?;
            let shutdown = shutdown_signal();
            let (_telemetry, health) = observe("herald-sink", &config, &shutdown);
            health.set_ready(true);
            herald_sink::serve(config.sink, shutdown).await?;
        }
        Command::Api => {
            let config = Arc::new(load()?);
            // A token policy that cannot hold is a start-up error, before waiting for NATS.
            let auth = herald_api::Auth::from_config(&config.api)?;
            let shutdown = shutdown_signal();
            let (_telemetry, health) = observe("herald-api", &config, &shutdown);
            let queue = connect_queue(&config).await?;
            herald_api::run(config, auth, queue, shutdown, health).await?;
        }
        Command::Dev(args) => {
            let config = dev::config(&args, cli.config.as_deref())?;
            let shutdown = shutdown_signal();
            let (_telemetry, health) = observe("herald-dev", &config, &shutdown);
            dev::run(args, config, shutdown, health).await?;
        }
        Command::Crds => print!("{}", herald_operator::crds_yaml()?),
        Command::Config => print!("{}", serde_yaml::to_string(&load()?)?),
        Command::Operator(args) => {
            let _telemetry = telemetry::init("herald-operator", false);
            herald_operator::cli::operator(args, shutdown_signal()).await?;
        }
        Command::Domain(cmd) => {
            if !herald_operator::cli::domain(cmd).await? {
                std::process::exit(1);
            }
        }
        Command::HashPassword => {
            let mut password = String::new();
            std::io::stdin().read_line(&mut password)?;
            let hash = herald_core::password::hash(password.trim_end_matches(['\r', '\n']))
                .map_err(anyhow::Error::msg)?;
            println!("{hash}");
        }
        Command::Status => {
            let config = load()?;
            let queue = connect_queue(&config).await?;
            let status = herald_api::queue_status(queue.jetstream()).await?;
            println!("{}", serde_json::to_string_pretty(&status)?);
        }
    }
    Ok(())
}
