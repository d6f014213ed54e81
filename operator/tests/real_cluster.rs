//! The operator against a real cluster, for those who have one (none can run here; the
//! reconcile scenarios in src/fixtures.rs cover the same behaviour against a mock API
//! server). `scripts/kind.sh` creates a kind cluster, installs the CRDs and runs this:
//!
//! ```sh
//! scripts/kind.sh            # or, with any cluster and the CRDs applied:
//! cargo test --ignore-rust-version -p herald-operator --test real_cluster -- --ignored
//! ```
//!
//! It creates and deletes `herald-test-op*` objects in `HERALD_TEST_NAMESPACE` (default
//! `default`) of the current kubeconfig context, and a Lease `herald-test-operator`.

use std::time::Duration;

use clap::Parser;
use herald_core::resources::{MailDomain, Verification};
use herald_operator::cli::{OperatorArgs, operator};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Client,
    api::{Api, DeleteParams, PostParams},
};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    operator: OperatorArgs,
}

async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn condition(md: &MailDomain, type_: &str) -> Option<String> {
    md.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.clone())
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster with the Herald CRDs installed"]
async fn real_cluster_operator_creates_and_recreates_the_dkim_secret() {
    let ns = std::env::var("HERALD_TEST_NAMESPACE").unwrap_or_else(|_| "default".into());
    let client = Client::try_default().await.expect("kubeconfig");
    let args = Args::parse_from([
        "operator",
        "--lease-name",
        "herald-test-operator",
        "--requeue-pending",
        "2s",
    ]);
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(operator(args.operator, shutdown));

    let mds: Api<MailDomain> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let md: MailDomain = serde_json::from_value(serde_json::json!({
        "apiVersion": "herald.dev/v1alpha1",
        "kind": "MailDomain",
        "metadata": {"name": "herald-test-op", "namespace": ns},
        "spec": {"domain": "herald-test-op.example", "verification": "Skip"},
    }))
    .expect("MailDomain");
    assert_eq!(md.spec.verification, Verification::Skip);
    mds.create(&PostParams::default(), &md)
        .await
        .expect("create MailDomain");

    // A key Secret owned by the MailDomain, and a Ready status with the record to publish.
    let secret_name = "herald-test-op-dkim";
    let first = eventually("the DKIM Secret", || async {
        secrets.get_opt(secret_name).await.ok().flatten()
    })
    .await;
    let owners = first.metadata.owner_references.clone().unwrap_or_default();
    assert!(
        owners
            .iter()
            .any(|o| o.kind == "MailDomain" && o.name == "herald-test-op"),
        "{owners:?}"
    );
    let ready = eventually("Ready=True", || async {
        let md = mds.get("herald-test-op").await.ok()?;
        (condition(&md, "Ready").as_deref() == Some("True")).then_some(md)
    })
    .await;
    let record = |md: &MailDomain| {
        md.status
            .as_ref()
            .map(|s| format!("{:?}", s.selectors))
            .unwrap_or_default()
    };
    let before = record(&ready);
    assert!(before.contains("p="), "the TXT record to publish: {before}");

    // A deleted key is recreated, and the record to publish changes with it.
    secrets
        .delete(secret_name, &DeleteParams::default())
        .await
        .expect("delete Secret");
    let second = eventually("the recreated Secret", || async {
        let s = secrets.get_opt(secret_name).await.ok().flatten()?;
        (s.metadata.uid != first.metadata.uid).then_some(s)
    })
    .await;
    assert_ne!(second.data, first.data, "a new key");
    eventually("a new record in status", || async {
        let md = mds.get("herald-test-op").await.ok()?;
        (record(&md) != before).then_some(())
    })
    .await;

    let _ = mds.delete("herald-test-op", &DeleteParams::default()).await;
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(20), running).await;
}
