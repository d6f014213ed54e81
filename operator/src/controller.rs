//! The reconcilers: MailDomain (DKIM key Secret, DNS verification, status) and SmtpAccount
//! (its references). Plain functions over a [`Context`], in the kube-rs controller style;
//! status is written by server-side apply under [`FIELD_MANAGER`], always whole, as observed.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures::StreamExt;
use herald_core::resources::{DKIM_SECRET_LABEL, MailDomain, SmtpAccount, SmtpAccountStatus};
use k8s_openapi::jiff::Timestamp;
use k8s_openapi::{
    ByteString, api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams, PostParams},
    runtime::{
        Controller,
        controller::Action,
        events::{Event, EventType, Recorder},
        reflector::ObjectRef,
        watcher,
    },
};
use serde_json::json;
use tokio::sync::watch;

use crate::{
    Error, dkim,
    dns::Lookup,
    domain::{self, Observation, Transition},
    records::{self, DnsPolicy},
    rotation,
};

/// Field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "herald-operator";

/// What every reconcile needs. Nothing global: tests build one around a mock API server.
pub struct Context {
    pub client: Client,
    /// Publishes Kubernetes Events on state transitions (`kubectl describe maildomain`).
    pub recorder: Recorder,
    pub lookup: Arc<dyn Lookup>,
    pub policy: DnsPolicy,
    /// Next check while records are not verified (people are editing DNS right now).
    pub requeue_pending: Duration,
    /// Next check once verified (records can still be lost later).
    pub requeue_verified: Duration,
    /// RFC 3339 "now"; a function so tests can fix it.
    pub clock: fn() -> String,
}

/// The current time as RFC 3339, to the second.
pub fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// A Secret's `data` and `stringData` as text, key by key.
pub(crate) fn decode(secret: &Secret) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (k, v) in secret.data.iter().flatten() {
        // PEM is ASCII; a non-UTF-8 value is not a key we can use, and leaving it out makes
        // the status say the key is missing.
        if let Ok(s) = String::from_utf8(v.0.clone()) {
            out.insert(k.clone(), s);
        }
    }
    for (k, v) in secret.string_data.iter().flatten() {
        out.insert(k.clone(), v.clone());
    }
    out
}

/// The DKIM Secret's data after [`ensure_keys`], and what was written to it.
struct Keys {
    data: BTreeMap<String, String>,
    /// Keys generated in this reconcile (new Secret, or added to ours).
    generated: Vec<&'static str>,
    /// The operator made this Secret (labelled for this MailDomain): it may rotate keys in it.
    ours: bool,
    /// When the Secret was created (`None` when the API server did not say).
    created: Option<Timestamp>,
    /// It carries the label the data plane selects Secrets by.
    labelled: bool,
}

/// Makes sure the DKIM Secret exists with every key the spec asks for: creates it when
/// absent (owned by the MailDomain, so it goes when the domain goes), adds missing keys to a
/// Secret the operator made, and never writes into a Secret someone else made.
async fn ensure_keys(
    md: &MailDomain,
    secrets: &Api<Secret>,
    secret_name: &str,
    now: Timestamp,
) -> Result<Keys, Error> {
    let name = md.name_any();
    match secrets.get_opt(secret_name).await? {
        None => {
            let mut data = BTreeMap::new();
            for (key, alg) in md
                .spec
                .dkim
                .keys()
                .into_iter()
                .map(|(_, a)| (a.secret_key(), a))
            {
                data.insert(key.to_string(), dkim::generate(alg)?);
            }
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(secret_name.to_string()),
                    namespace: md.namespace(),
                    labels: Some(BTreeMap::from([(
                        DKIM_SECRET_LABEL.to_string(),
                        name.clone(),
                    )])),
                    owner_references: md.controller_owner_ref(&()).map(|o| vec![o]),
                    ..ObjectMeta::default()
                },
                type_: Some("Opaque".into()),
                data: Some(
                    data.iter()
                        .map(|(k, v)| (k.clone(), ByteString(v.clone().into_bytes())))
                        .collect(),
                ),
                ..Secret::default()
            };
            secrets.create(&PostParams::default(), &secret).await?;
            tracing::info!(maildomain = %name, secret = secret_name, "DKIM Secret created");
            let generated = md
                .spec
                .dkim
                .keys()
                .into_iter()
                .map(|(_, a)| a.secret_key())
                .collect();
            Ok(Keys {
                data,
                generated,
                ours: true,
                created: Some(now),
                labelled: true,
            })
        }
        Some(secret) => {
            let mut data = decode(&secret);
            let missing = domain::missing_keys(md, &data);
            let ours = secret
                .labels()
                .get(DKIM_SECRET_LABEL)
                .is_some_and(|v| v == &name);
            let created = secret.metadata.creation_timestamp.as_ref().map(|t| t.0);
            let labelled = secret.labels().contains_key(DKIM_SECRET_LABEL);
            if missing.is_empty() || !ours {
                return Ok(Keys {
                    data,
                    generated: Vec::new(),
                    ours,
                    created,
                    labelled,
                });
            }
            let mut added = BTreeMap::new();
            let generated = missing.iter().map(|(k, _)| *k).collect();
            for (key, alg) in missing {
                let pem = dkim::generate(alg)?;
                added.insert(key.to_string(), ByteString(pem.clone().into_bytes()));
                data.insert(key.to_string(), pem);
            }
            // A merge patch adds keys without touching the existing ones.
            secrets
                .patch(
                    secret_name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({ "data": added })),
                )
                .await?;
            tracing::info!(maildomain = %name, secret = secret_name, "DKIM keys added to Secret");
            Ok(Keys {
                data,
                generated,
                ours,
                created,
                labelled: true,
            })
        }
    }
}

/// DNS record states per MailDomain, as a gauge: for each state, how many of the domain's
/// expected records are in it (every state is recorded, so a record that moves is not
/// counted twice).
fn record_state_metrics(md: &MailDomain, records: &[herald_core::resources::DnsRecordStatus]) {
    use herald_core::resources::RecordState;
    static GAUGE: std::sync::OnceLock<opentelemetry::metrics::Gauge<u64>> =
        std::sync::OnceLock::new();
    let gauge = GAUGE.get_or_init(|| {
        opentelemetry::global::meter("herald.operator")
            .u64_gauge("herald.operator.dns.records")
            .with_description("Expected DNS records of a MailDomain, by verification state")
            .with_unit("{record}")
            .build()
    });
    let name = format!("{}/{}", md.namespace().unwrap_or_default(), md.name_any());
    for state in [
        RecordState::Verified,
        RecordState::Missing,
        RecordState::Mismatch,
        RecordState::Error,
    ] {
        let n = records.iter().filter(|r| r.state == state).count() as u64;
        gauge.record(
            n,
            &[
                opentelemetry::KeyValue::new("maildomain", name.clone()),
                opentelemetry::KeyValue::new("state", state.as_str()),
            ],
        );
    }
}

/// Reconciles one MailDomain: keys, DNS, status. Requeues fast until ready.
#[tracing::instrument(
    name = "operator.reconcile",
    skip_all,
    fields(k8s.namespace.name = md.namespace().unwrap_or_default(), herald.maildomain = %md.name_any(), herald.kind = "MailDomain")
)]
pub async fn reconcile_domain(md: Arc<MailDomain>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = md.namespace().ok_or(Error::NotNamespaced)?;
    let name = md.name_any();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let secret_name = md
        .spec
        .dkim
        .secret_name
        .clone()
        .unwrap_or_else(|| format!("{name}-dkim"));
    let now_text = (ctx.clock)();
    let now: Timestamp = now_text
        .parse()
        .map_err(|e| Error::Input(format!("clock gave {now_text:?}: {e}")))?;
    let mut keys = ensure_keys(&md, &secrets, &secret_name, now).await?;
    let mut events = Vec::new();

    // Rotation, retire and start: decided from the Secret alone.
    if keys.ours {
        let created = keys
            .data
            .get(rotation::KEYS_CREATED_AT)
            .and_then(|t| t.trim().parse().ok())
            .or(keys.created);
        let mut changes = Vec::new();
        if let Some(c) = rotation::retire(&keys.data, now) {
            c.apply(&mut keys.data);
            changes.push(c);
        }
        if let Some(created) = created
            && let Some(c) = rotation::start(&md, &keys.data, created, now)?
        {
            c.apply(&mut keys.data);
            changes.push(c);
        }
        for c in changes {
            write_change(&secrets, &secret_name, &c).await?;
            events.push(c.event);
        }
    }

    let mut status = observe(&ctx, &md, &keys, &secret_name, &now_text).await;
    // Rotation, promote: only once DNS shows every next record.
    if keys.ours
        && let Some(c) = rotation::promote(&md, &keys.data, &status.selectors, &status.records, now)
    {
        write_change(&secrets, &secret_name, &c).await?;
        c.apply(&mut keys.data);
        events.push(c.event);
        status = observe(&ctx, &md, &keys, &secret_name, &now_text).await;
    }
    record_state_metrics(&md, &status.records);
    let ready = domain::is_ready(&status);
    let verified = status
        .conditions
        .iter()
        .any(|c| c.type_ == domain::DNS_VERIFIED && c.status == "True");
    tracing::info!(maildomain = %name, namespace, ready, dns_verified = verified, "MailDomain checked");
    let domains: Api<MailDomain> = Api::namespaced(ctx.client.clone(), &namespace);
    domains
        .patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(json!({
                "apiVersion": "herald.dev/v1alpha1",
                "kind": "MailDomain",
                "status": status,
            })),
        )
        .await?;

    events.extend(domain::transitions(md.status.as_ref(), &status));
    if !keys.generated.is_empty() {
        events.insert(
            0,
            Transition {
                warning: false,
                reason: "DkimKeyCreated",
                action: "GenerateKey".into(),
                note: format!(
                    "{} generated in Secret {secret_name}; publish the records in status.selectors",
                    keys.generated.join(", ")
                ),
            },
        );
    }
    publish(&ctx, &md, events).await;
    Ok(Action::requeue(if verified {
        ctx.requeue_verified
    } else {
        ctx.requeue_pending
    }))
}

async fn observe(
    ctx: &Context,
    md: &MailDomain,
    keys: &Keys,
    secret_name: &str,
    now: &str,
) -> herald_core::resources::MailDomainStatus {
    domain::observe(
        ctx.lookup.as_ref(),
        &ctx.policy,
        Observation {
            md,
            secret: Some(&keys.data),
            secret_name,
            ownership_token: md.uid().map(|uid| records::ownership_token(&uid)),
            now: now.to_string(),
            secret_labelled: keys.labelled,
        },
    )
    .await
}

/// Writes a rotation step into the Secret: a merge patch, where `null` deletes an entry.
async fn write_change(
    secrets: &Api<Secret>,
    secret_name: &str,
    change: &rotation::Change,
) -> Result<(), Error> {
    let mut data = serde_json::Map::new();
    for (k, v) in &change.set {
        data.insert(k.clone(), json!(ByteString(v.clone().into_bytes())));
    }
    for k in &change.remove {
        data.insert(k.clone(), serde_json::Value::Null);
    }
    secrets
        .patch(
            secret_name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "data": data })),
        )
        .await?;
    tracing::info!(
        secret = secret_name,
        step = change.event.reason,
        "DKIM rotation step written"
    );
    Ok(())
}

/// Publishes transitions as Events on the MailDomain. Best effort: an Event that cannot be
/// written is logged, and the reconcile (whose status is already written) still succeeds.
async fn publish(ctx: &Context, md: &MailDomain, transitions: Vec<Transition>) {
    let reference = md.object_ref(&());
    for t in transitions {
        // The Events API refuses notes above 1 kB and actions above 128 octets.
        let note = truncate(t.note, 1024);
        let action = truncate(t.action, 128);
        let event = Event {
            type_: if t.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: t.reason.into(),
            note: Some(note),
            action,
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &reference).await {
            tracing::warn!(maildomain = %md.name_any(), reason = t.reason, error = %e, "cannot publish event");
        }
    }
}

/// `s` cut to at most `max` octets (on a char boundary), marked with "..." when cut.
fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max - 3;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

/// Reconciles one SmtpAccount: says in status whether its Secret and MailDomains exist and
/// are ready. Ingress decides per message itself; this status is for the people.
#[tracing::instrument(
    name = "operator.reconcile",
    skip_all,
    fields(k8s.namespace.name = acct.namespace().unwrap_or_default(), herald.smtpaccount = %acct.name_any(), herald.kind = "SmtpAccount")
)]
pub async fn reconcile_account(acct: Arc<SmtpAccount>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = acct.namespace().ok_or(Error::NotNamespaced)?;
    let name = acct.name_any();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let domains: Api<MailDomain> = Api::namespaced(ctx.client.clone(), &namespace);
    let now = (ctx.clock)();
    let generation = acct.metadata.generation;
    let previous = acct.status.as_ref().map(|s| s.conditions.as_slice());
    let cond = |type_: &str, ok: bool, reason: &str, message: String| {
        domain::condition(type_, ok, reason, message, generation, &now, previous)
    };

    let r = &acct.spec.password_secret;
    let secret_cond = match secrets.get_opt(&r.name).await? {
        None => cond(
            "SecretReady",
            false,
            "SecretNotFound",
            format!("Secret {} not found", r.name),
        ),
        Some(s) if !decode(&s).contains_key(&r.key) => cond(
            "SecretReady",
            false,
            "KeyNotFound",
            format!("Secret {} has no key {}", r.name, r.key),
        ),
        Some(_) => cond(
            "SecretReady",
            true,
            "SecretFound",
            format!("password in {}/{}", r.name, r.key),
        ),
    };

    let mut problems = Vec::new();
    let mut missing = false;
    for d in &acct.spec.allowed_domains {
        match domains.get_opt(d).await? {
            None => {
                missing = true;
                problems.push(format!("MailDomain {d} not found"));
            }
            Some(md) => {
                let ready = md.status.as_ref().is_some_and(domain::is_ready);
                if !ready {
                    problems.push(format!("MailDomain {d} is not Ready"));
                }
            }
        }
    }
    let domains_cond = if acct.spec.allowed_domains.is_empty() {
        cond(
            "DomainsReady",
            false,
            "NoDomains",
            "allowedDomains is empty: the account cannot send".into(),
        )
    } else if problems.is_empty() {
        cond(
            "DomainsReady",
            true,
            "AllDomainsReady",
            format!("{} MailDomain(s) ready", acct.spec.allowed_domains.len()),
        )
    } else if missing {
        cond("DomainsReady", false, "DomainNotFound", problems.join("; "))
    } else {
        cond("DomainsReady", false, "DomainNotReady", problems.join("; "))
    };
    let ready_cond = match (&secret_cond, &domains_cond) {
        (s, _) if s.status != "True" => cond("Ready", false, &s.reason, s.message.clone()),
        (_, d) if d.status != "True" => cond("Ready", false, &d.reason, d.message.clone()),
        _ => cond(
            "Ready",
            true,
            "Ready",
            "the account can authenticate and send".into(),
        ),
    };
    let ready = ready_cond.status == "True";
    let status = SmtpAccountStatus {
        conditions: vec![secret_cond, domains_cond, ready_cond],
        observed_generation: generation,
    };
    tracing::info!(smtpaccount = %name, namespace, ready, "SmtpAccount checked");
    let accounts: Api<SmtpAccount> = Api::namespaced(ctx.client.clone(), &namespace);
    accounts
        .patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(json!({
                "apiVersion": "herald.dev/v1alpha1",
                "kind": "SmtpAccount",
                "status": status,
            })),
        )
        .await?;
    // Domains become ready on their own schedule; look again soon while waiting for them.
    Ok(Action::requeue(if ready {
        ctx.requeue_verified
    } else {
        ctx.requeue_pending
    }))
}

/// After a failed reconcile (API error, key generation failure): retry after a short pause
/// rather than at once, so a broken API server is not hammered.
pub fn error_policy<K>(_obj: Arc<K>, err: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(error = %err, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(15))
}

/// Resolves once `shutdown` turns true (or its sender is gone: the process is ending).
pub(crate) async fn stopped(mut shutdown: watch::Receiver<bool>) {
    while !*shutdown.borrow_and_update() {
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

/// Runs both controllers until `shutdown` turns true; reconciles in flight finish first.
pub async fn run(ctx: Arc<Context>, shutdown: watch::Receiver<bool>) {
    let client = ctx.client.clone();
    let domains = Controller::new(
        Api::<MailDomain>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(
        Api::<Secret>::all(client.clone()),
        watcher::Config::default().labels(DKIM_SECRET_LABEL),
    )
    .graceful_shutdown_on(stopped(shutdown.clone()))
    .run(reconcile_domain, error_policy, ctx.clone())
    .for_each(|res| async move {
        if let Err(e) = res {
            tracing::warn!(error = %e, "MailDomain reconcile error");
        }
    });
    let accounts = Controller::new(
        Api::<SmtpAccount>::all(client.clone()),
        watcher::Config::default(),
    );
    // An account's status follows its domains: when a MailDomain changes, re-check the
    // accounts (from the controller's own cache) that list it.
    let store = accounts.store();
    let accounts = accounts
        .watches(
            Api::<MailDomain>::all(client),
            watcher::Config::default(),
            move |md: MailDomain| {
                let (ns, name) = (md.namespace(), md.name_any());
                store
                    .state()
                    .into_iter()
                    .filter(|a| a.namespace() == ns && a.spec.allowed_domains.contains(&name))
                    .map(|a| ObjectRef::from_obj(a.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .graceful_shutdown_on(stopped(shutdown))
        .run(reconcile_account, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::warn!(error = %e, "SmtpAccount reconcile error");
            }
        });
    futures::join!(domains, accounts);
}
