//! Kubernetes mode: MailDomains, SmtpAccounts and the labelled Secrets of one namespace,
//! kept current by kube watchers and turned into a [`Resources`] snapshot on every change.
//!
//! Four watchers run side by side, each feeding a reflector store: MailDomains,
//! SmtpAccounts, Secrets labelled [`DKIM_SECRET_LABEL`] and Secrets labelled
//! [`ACCOUNT_SECRET_LABEL`]. A label selector cannot say "this label or that one", hence two
//! Secret watchers; no other Secret is ever listed, so a data-plane pod never holds
//! credentials that are not Herald's.
//!
//! The source becomes ready once every watcher has completed its first list and that view
//! was valid. After that, every event rebuilds the snapshot through [`Documents`] and
//! [`Resources::from_documents`] (the same rules as files mode); a snapshot that does not
//! build is logged and the last good one stays. The watcher re-lists after a desync (`410
//! Gone`) and the store is replaced by what that list returned, so an object deleted while
//! the watch was down disappears too.

use std::sync::{Arc, RwLock};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client, Resource,
    runtime::{WatchStreamExt, reflector, reflector::Store, watcher},
};
use serde::de::DeserializeOwned;
use tokio::{sync::watch, task::AbortHandle};

use super::{
    ACCOUNT_SECRET_LABEL, DKIM_SECRET_LABEL, Documents, MailDomain, ResourceSource, Resources,
    SmtpAccount,
};
use crate::config::ResourcesConfig;

/// What one watcher watches; the index into the sync flags.
#[derive(Debug, Clone, Copy)]
enum Watched {
    MailDomains,
    SmtpAccounts,
    DkimSecrets,
    AccountSecrets,
}

impl Watched {
    const ALL: usize = 4;

    fn as_str(self) -> &'static str {
        match self {
            Watched::MailDomains => "maildomains",
            Watched::SmtpAccounts => "smtpaccounts",
            Watched::DkimSecrets => "secrets (herald.dev/maildomain)",
            Watched::AccountSecrets => "secrets (herald.dev/smtpaccount)",
        }
    }
}

/// What a watcher event means for the snapshot.
enum Update {
    /// The store changed (an object applied or deleted).
    Changed,
    /// A (re-)list finished: the store now holds exactly what the list returned.
    Listed,
    /// A (re-)list is in progress: the store is unchanged until it completes.
    Listing,
    /// The watch failed; the watcher retries with backoff and the store keeps its objects.
    Failed(String),
}

/// The stores the watchers keep current.
struct Stores {
    domains: Store<MailDomain>,
    accounts: Store<SmtpAccount>,
    dkim_secrets: Store<Secret>,
    account_secrets: Store<Secret>,
}

impl Stores {
    /// The stores' contents as documents, as files mode would have read them.
    fn documents(&self) -> Documents {
        let mut docs = Documents {
            mail_domains: self.domains.state().iter().map(|d| (**d).clone()).collect(),
            smtp_accounts: self
                .accounts
                .state()
                .iter()
                .map(|a| (**a).clone())
                .collect(),
            ..Documents::default()
        };
        // A Secret carrying both labels is in both stores with the same data.
        for secret in self
            .dkim_secrets
            .state()
            .into_iter()
            .chain(self.account_secrets.state())
        {
            // Unlike a file, one odd Secret must not freeze every other update: a value that
            // is not UTF-8 is left out, so the domain or account using it reads as missing
            // its key (the operator judges such values the same way).
            for key in docs.add_secret(&secret) {
                tracing::warn!(
                    namespace = secret.metadata.namespace.as_deref().unwrap_or_default(),
                    secret = secret.metadata.name.as_deref().unwrap_or_default(),
                    key = %key,
                    "Secret value is not UTF-8; ignoring it"
                );
            }
        }
        docs
    }
}

/// State shared between the source and its watch task.
struct Shared {
    current: RwLock<Arc<Resources>>,
    ready: watch::Sender<bool>,
}

/// Resources read from the Kubernetes API of one namespace. Dropping it stops the watchers.
pub struct KubeSource {
    shared: Arc<Shared>,
    namespace: String,
    task: AbortHandle,
}

/// The namespace to watch: `resources.namespace` when set, else `POD_NAMESPACE` (the
/// Downward API), else the client's default (the service account's namespace in a pod, the
/// kubeconfig context's outside).
pub fn namespace_for(config: &ResourcesConfig, client: &Client) -> String {
    choose_namespace(
        &config.namespace,
        std::env::var("POD_NAMESPACE").ok(),
        client.default_namespace(),
    )
}

fn choose_namespace(configured: &str, pod: Option<String>, client_default: &str) -> String {
    if !configured.trim().is_empty() {
        return configured.trim().to_string();
    }
    match pod {
        Some(ns) if !ns.trim().is_empty() => ns.trim().to_string(),
        _ => client_default.to_string(),
    }
}

impl KubeSource {
    /// Connects with the in-cluster service account (or the local kubeconfig) and starts
    /// watching the namespace [`namespace_for`] chooses. Must run on a Tokio runtime.
    pub async fn connect(config: &ResourcesConfig) -> Result<Arc<KubeSource>, kube::Error> {
        let client = Client::try_default().await?;
        let namespace = namespace_for(config, &client);
        Ok(KubeSource::start(client, namespace))
    }

    /// Starts the watchers on `namespace`. The snapshot is empty and the source not ready
    /// until every watcher has listed once. Must run on a Tokio runtime.
    pub fn start(client: Client, namespace: String) -> Arc<KubeSource> {
        let (ready, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            current: RwLock::new(Arc::new(Resources::default())),
            ready,
        });
        tracing::info!(namespace = %namespace, "watching MailDomains, SmtpAccounts and labelled Secrets");
        let task = tokio::spawn(run(client, namespace.clone(), shared.clone())).abort_handle();
        Arc::new(KubeSource {
            shared,
            namespace,
            task,
        })
    }

    /// The namespace being watched.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// True once every watcher completed its first list and a valid snapshot was built.
    /// It stays true afterwards: while a watch is down the last view keeps serving.
    pub fn is_ready(&self) -> bool {
        *self.shared.ready.borrow()
    }

    /// Resolves once [`Self::is_ready`] is true. Roles await it before they report ready.
    pub async fn wait_ready(&self) {
        let mut ready = self.shared.ready.subscribe();
        // The sender lives in `self.shared`, so `wait_for` cannot see it closed while
        // `self` is borrowed; an error would only mean the source is gone.
        let _ = ready.wait_for(|&r| r).await;
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ResourceSource for KubeSource {
    fn current(&self) -> Arc<Resources> {
        match self.shared.current.read() {
            Ok(r) => r.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// One watcher with its reflector, its events reduced to what they mean for the snapshot.
fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    which: Watched,
) -> (
    Store<K>,
    impl Stream<Item = (Watched, Update)> + Send + 'static,
)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync,
    K: 'static,
{
    let (store, writer) = reflector::store();
    let events = watcher(api, config)
        .default_backoff()
        .reflect(writer)
        .map(move |event| {
            let update = match event {
                Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => Update::Changed,
                Ok(watcher::Event::InitDone) => Update::Listed,
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => Update::Listing,
                Err(e) => Update::Failed(e.to_string()),
            };
            (which, update)
        });
    (store, events)
}

async fn run(client: Client, namespace: String, shared: Arc<Shared>) {
    let (domains, domain_events) = watch(
        Api::<MailDomain>::namespaced(client.clone(), &namespace),
        watcher::Config::default(),
        Watched::MailDomains,
    );
    let (accounts, account_events) = watch(
        Api::<SmtpAccount>::namespaced(client.clone(), &namespace),
        watcher::Config::default(),
        Watched::SmtpAccounts,
    );
    let (dkim_secrets, dkim_events) = watch(
        Api::<Secret>::namespaced(client.clone(), &namespace),
        watcher::Config::default().labels(DKIM_SECRET_LABEL),
        Watched::DkimSecrets,
    );
    let (account_secrets, secret_events) = watch(
        Api::<Secret>::namespaced(client, &namespace),
        watcher::Config::default().labels(ACCOUNT_SECRET_LABEL),
        Watched::AccountSecrets,
    );
    let stores = Stores {
        domains,
        accounts,
        dkim_secrets,
        account_secrets,
    };
    let events = futures::stream::select_all([
        domain_events.boxed(),
        account_events.boxed(),
        dkim_events.boxed(),
        secret_events.boxed(),
    ]);
    // Events that arrive together (a re-list, a burst of edits) make one rebuild.
    let mut batches = events.ready_chunks(64);
    let mut listed = [false; Watched::ALL];
    while let Some(batch) = batches.next().await {
        let mut changed = false;
        for (which, update) in batch {
            match update {
                Update::Changed => changed = true,
                Update::Listed => {
                    listed[which as usize] = true;
                    changed = true;
                    tracing::debug!(namespace = %namespace, watched = which.as_str(), "listed");
                }
                Update::Listing => {}
                Update::Failed(error) => tracing::warn!(
                    namespace = %namespace,
                    watched = which.as_str(),
                    error = %error,
                    "watch failed; retrying"
                ),
            }
        }
        // Before every watcher has listed once, a view would be partial (an account without
        // its password Secret, a domain without its keys): nothing is published until then.
        if !changed || !listed.iter().all(|&l| l) {
            continue;
        }
        let docs = stores.documents();
        let (domains, accounts) = (docs.mail_domains.len(), docs.smtp_accounts.len());
        match Resources::from_documents(docs) {
            Ok(resources) => {
                match shared.current.write() {
                    Ok(mut cur) => *cur = Arc::new(resources),
                    Err(poisoned) => *poisoned.into_inner() = Arc::new(resources),
                }
                tracing::info!(namespace = %namespace, domains, accounts, "resources updated");
                shared
                    .ready
                    .send_if_modified(|ready| !std::mem::replace(ready, true));
            }
            Err(error) => tracing::error!(
                namespace = %namespace,
                error = %error,
                "resources do not build; keeping the previous view"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::choose_namespace;

    #[test]
    fn configured_namespace_wins_then_pod_namespace_then_client_default() {
        assert_eq!(
            choose_namespace("mail", Some("pod-ns".into()), "default"),
            "mail"
        );
        assert_eq!(
            choose_namespace("", Some("pod-ns".into()), "default"),
            "pod-ns"
        );
        assert_eq!(
            choose_namespace("", Some(" ".into()), "kube-ctx"),
            "kube-ctx"
        );
        assert_eq!(choose_namespace("", None, "kube-ctx"), "kube-ctx");
    }
}
