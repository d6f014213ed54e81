//! The operator's subcommands: `herald operator` (the controllers) and `herald domain check`
//! (the same verification outside Kubernetes, on files-mode YAML).

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use herald_core::resources::Documents;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{
    Api,
    runtime::events::{Recorder, Reporter},
};
use tokio::sync::watch;

use crate::{
    Error,
    controller::{self, Context},
    dns::HickoryLookup,
    domain::{self, Observation},
    lease::{self, LeaseConfig},
    records::{DnsPolicy, ReturnPathTarget},
};

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime_serde::re::humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// How DNS is asked, and what every domain's records must authorise.
#[derive(clap::Args, Debug, Clone)]
pub struct DnsArgs {
    /// Nameserver asked for verification (`ip:port`; repeat or comma-separate). Only these
    /// are asked: the system resolver is never used.
    #[arg(
        long = "nameserver",
        env = "HERALD_OPERATOR_NAMESERVERS",
        value_delimiter = ',',
        default_value = "127.0.0.1:53"
    )]
    pub nameservers: Vec<SocketAddr>,
    /// Timeout of one DNS query.
    #[arg(long, env = "HERALD_OPERATOR_DNS_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub dns_timeout: Duration,
    /// Source IP Herald sends from, optionally with its EHLO name (`IP` or `IP=NAME`; repeat
    /// or comma-separate). Every domain's SPF must authorise the IP; with a name, the IP's
    /// PTR must be that name and the name must resolve back to the IP.
    #[arg(
        long = "egress-ip",
        env = "HERALD_OPERATOR_EGRESS_IPS",
        value_delimiter = ','
    )]
    pub egress_ips: Vec<EgressIp>,
    /// SPF record to include instead of listing the egress IPs (`include:<this>`).
    #[arg(long, env = "HERALD_OPERATOR_SPF_INCLUDE")]
    pub spf_include: Option<String>,
    /// Host each MailDomain's `returnPath` must be a CNAME of.
    #[arg(
        long,
        env = "HERALD_OPERATOR_RETURN_PATH_CNAME",
        conflicts_with = "return_path_mx"
    )]
    pub return_path_cname: Option<String>,
    /// Host each MailDomain's `returnPath` must have as MX.
    #[arg(long, env = "HERALD_OPERATOR_RETURN_PATH_MX")]
    pub return_path_mx: Option<String>,
}

/// An egress IP and, optionally, the EHLO name it sends with: `IP` or `IP=NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressIp {
    pub ip: IpAddr,
    pub ehlo: Option<String>,
}

impl std::str::FromStr for EgressIp {
    type Err = String;

    fn from_str(s: &str) -> Result<EgressIp, String> {
        let (ip, ehlo) = match s.split_once('=') {
            Some((ip, name)) => (ip, Some(name.trim().to_string())),
            None => (s, None),
        };
        let ip = ip
            .trim()
            .parse()
            .map_err(|e| format!("{ip:?} is not an IP address: {e}"))?;
        if ehlo.as_deref() == Some("") {
            return Err(format!("{s:?}: empty EHLO name after ="));
        }
        Ok(EgressIp { ip, ehlo })
    }
}

impl DnsArgs {
    fn policy(&self) -> DnsPolicy {
        DnsPolicy {
            egress_ips: self.egress_ips.iter().map(|e| e.ip).collect(),
            egress_names: self
                .egress_ips
                .iter()
                .filter_map(|e| e.ehlo.clone().map(|n| (e.ip, n)))
                .collect(),
            spf_include: self.spf_include.clone(),
            return_path: match (&self.return_path_cname, &self.return_path_mx) {
                (Some(c), _) => Some(ReturnPathTarget::Cname(c.clone())),
                (None, Some(m)) => Some(ReturnPathTarget::Mx(m.clone())),
                (None, None) => None,
            },
        }
    }

    fn lookup(&self) -> Result<HickoryLookup, Error> {
        HickoryLookup::new(&self.nameservers, self.dns_timeout).map_err(Error::Resolver)
    }
}

/// `herald operator`.
#[derive(clap::Args, Debug, Clone)]
pub struct OperatorArgs {
    #[command(flatten)]
    pub dns: DnsArgs,
    /// Re-check interval while a domain's records are not all verified.
    #[arg(long, env = "HERALD_OPERATOR_REQUEUE_PENDING", default_value = "1m", value_parser = parse_duration)]
    pub requeue_pending: Duration,
    /// Re-check interval once every record is verified.
    #[arg(long, env = "HERALD_OPERATOR_REQUEUE_VERIFIED", default_value = "1h", value_parser = parse_duration)]
    pub requeue_verified: Duration,
    /// Lease (in the operator's own namespace) that elects the one replica reconciling.
    #[arg(
        long,
        env = "HERALD_OPERATOR_LEASE_NAME",
        default_value = "herald-operator"
    )]
    pub lease_name: String,
    /// How long a leader's Lease lasts without renewal; it is renewed every third of it.
    #[arg(long, env = "HERALD_OPERATOR_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,
}

/// `herald domain ...`.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum DomainCommand {
    /// Check the DNS records of every MailDomain in FILE (files-mode YAML, with its DKIM
    /// Secret) and print what to publish. Exits 1 unless every domain is ready.
    Check {
        /// YAML file with MailDomain documents and their DKIM Secrets.
        file: PathBuf,
        /// Check only the MailDomain of this name (default: every MailDomain in the file).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        dns: DnsArgs,
    },
}

/// Runs the controllers against the cluster of the current kubeconfig / service account
/// until `shutdown` turns true, once this replica holds the leader Lease.
pub async fn operator(args: OperatorArgs, shutdown: watch::Receiver<bool>) -> Result<(), Error> {
    let client = kube::Client::try_default().await?;
    let pod = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .ok();
    let identity = match &pod {
        Some(p) => p.clone(),
        // Outside a pod: unique enough per process on one machine.
        None => format!("herald-operator-{}", std::process::id()),
    };
    let lease_cfg = LeaseConfig {
        name: args.lease_name.clone(),
        namespace: client.default_namespace().to_string(),
        identity: identity.clone(),
        duration: args.lease_duration,
    };
    let leases: Api<Lease> = Api::namespaced(client.clone(), &lease_cfg.namespace);
    let Some(lost) = lease::acquire(leases, lease_cfg, shutdown.clone()).await? else {
        return Ok(());
    };
    let reporter = Reporter {
        controller: controller::FIELD_MANAGER.into(),
        instance: Some(identity),
    };
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client,
        lookup: Arc::new(args.dns.lookup()?),
        policy: args.dns.policy(),
        requeue_pending: args.requeue_pending,
        requeue_verified: args.requeue_verified,
        clock: controller::now_rfc3339,
    });
    tracing::info!(nameservers = ?args.dns.nameservers, "operator starting");
    // Stop on shutdown or when leadership is lost, whichever comes first.
    let (stop_tx, stop_rx) = watch::channel(false);
    let lost_flag = lost.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = controller::stopped(shutdown) => {}
            _ = controller::stopped(lost) => {}
        }
        let _ = stop_tx.send(true);
    });
    controller::run(ctx, stop_rx).await;
    if *lost_flag.borrow() {
        return Err(Error::LeadershipLost);
    }
    Ok(())
}

/// Runs a `herald domain` command, printing to stdout. `Ok(true)` when every domain checked
/// is ready.
pub async fn domain(cmd: DomainCommand) -> Result<bool, Error> {
    let DomainCommand::Check { file, name, dns } = cmd;
    let docs = read(&file)?;
    let selected: Vec<_> = docs
        .mail_domains
        .iter()
        .filter(|md| name.is_none() || md.metadata.name == name)
        .collect();
    if selected.is_empty() {
        let which = name.map_or("no MailDomain".into(), |n| format!("no MailDomain {n}"));
        return Err(Error::Input(format!(
            "{}: {which} in the file",
            file.display()
        )));
    }
    let lookup = dns.lookup()?;
    let policy = dns.policy();
    let mut all_ready = true;
    for md in selected {
        let namespace = md.metadata.namespace.as_deref().unwrap_or("default");
        let secret_name = md.dkim_secret_name();
        let secret = docs.secrets.get(&format!("{namespace}/{secret_name}"));
        let status = domain::observe(
            &lookup,
            &policy,
            Observation {
                md,
                secret,
                secret_name: &secret_name,
                // Files mode has no uid to derive a token from, and no other tenant to prove
                // ownership against.
                ownership_token: None,
                now: controller::now_rfc3339(),
                // Files mode pairs Secrets by name; no label is needed there.
                secret_labelled: true,
            },
        )
        .await;
        print!("{}", domain::render(&md.spec.domain, &status));
        println!();
        all_ready &= domain::is_ready(&status);
    }
    Ok(all_ready)
}

fn read(file: &std::path::Path) -> Result<Documents, Error> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| Error::Input(format!("{}: {e}", file.display())))?;
    let mut docs = Documents::default();
    docs.add_yaml(file, &text)?;
    Ok(docs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn egress_ip_takes_an_optional_ehlo_name() {
        assert_eq!(
            "203.0.113.7".parse::<EgressIp>(),
            Ok(EgressIp {
                ip: "203.0.113.7".parse().expect("ip"),
                ehlo: None
            })
        );
        assert_eq!(
            "2001:db8::7=mta1.example.net".parse::<EgressIp>(),
            Ok(EgressIp {
                ip: "2001:db8::7".parse().expect("ip"),
                ehlo: Some("mta1.example.net".into())
            })
        );
        assert!("mta1.example.net".parse::<EgressIp>().is_err());
        assert!("203.0.113.7=".parse::<EgressIp>().is_err());
    }
}
