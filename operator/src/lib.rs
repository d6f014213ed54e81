//! Herald's Kubernetes operator.
//!
//! - The CustomResourceDefinitions of `MailDomain` and `SmtpAccount`, generated from the Rust
//!   types in `herald-core` (one source of truth): [`crds_yaml`], printed by `herald crds`.
//! - DKIM keys: each MailDomain gets a Secret with its private keys ([`dkim`]).
//! - DNS verification, record by record, on explicit nameservers ([`dns`], [`records`]).
//! - The reconcilers writing what they observed into status ([`controller`]), and the same
//!   check outside Kubernetes (`herald domain check`, [`cli`]).

pub mod cli;
pub mod controller;
pub mod dkim;
pub mod dns;
pub mod domain;
pub mod lease;
pub mod records;
pub mod rotation;

#[cfg(test)]
mod fixtures;

use herald_core::resources::{MailDomain, SmtpAccount};
use kube::CustomResourceExt;

/// Everything a reconcile or a check can fail on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("DKIM key: {0}")]
    Key(#[from] dkim::KeyError),
    #[error("resource has no namespace (MailDomain and SmtpAccount are namespaced)")]
    NotNamespaced,
    #[error("DNS resolver: {0}")]
    Resolver(String),
    #[error(transparent)]
    Resources(#[from] herald_core::Error),
    #[error("{0}")]
    Input(String),
    #[error("leadership lost: another replica holds the Lease")]
    LeadershipLost,
}

/// Both CRDs as one multi-document YAML stream, as `herald crds` prints it.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for crd in [MailDomain::crd(), SmtpAccount::crd()] {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn crd_json(crd: impl serde::Serialize) -> Value {
        serde_json::to_value(crd).expect("json")
    }

    fn spec_schema(crd: &Value) -> &Value {
        &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    }

    #[test]
    fn crds_name_group_version_and_status_subresource() {
        let yaml = crds_yaml().expect("yaml");
        assert!(yaml.contains("name: maildomains.herald.dev"));
        assert!(yaml.contains("name: smtpaccounts.herald.dev"));
        for crd in [crd_json(MailDomain::crd()), crd_json(SmtpAccount::crd())] {
            let v = &crd["spec"]["versions"][0];
            assert_eq!(v["name"], "v1alpha1");
            assert!(v["subresources"]["status"].is_object(), "{crd}");
            assert_eq!(crd["spec"]["scope"], "Namespaced");
        }
    }

    #[test]
    fn maildomain_columns_show_readiness_and_each_record_kind() {
        let crd = crd_json(MailDomain::crd());
        let cols: Vec<String> = crd["spec"]["versions"][0]["additionalPrinterColumns"]
            .as_array()
            .expect("columns")
            .iter()
            .map(|c| c["name"].as_str().unwrap_or_default().to_uppercase())
            .collect();
        for want in ["READY", "DKIM", "SPF", "DMARC", "MX", "AGE"] {
            assert!(
                cols.contains(&want.to_string()),
                "{want} missing from {cols:?}"
            );
        }
        assert_eq!(crd["spec"]["names"]["shortNames"][0], "md");
    }

    #[test]
    fn maildomain_schema_validates_domain_selector_and_enums() {
        let crd = crd_json(MailDomain::crd());
        let spec = spec_schema(&crd);
        assert!(
            spec["properties"]["domain"]["pattern"].is_string(),
            "{spec}"
        );
        assert!(spec["properties"]["domain"]["description"].is_string());
        let dkim = &spec["properties"]["dkim"]["properties"];
        assert!(dkim["selector"]["pattern"].is_string(), "{dkim}");
        let algs = dkim["algorithm"]["enum"]
            .as_array()
            .expect("algorithm enum");
        assert_eq!(algs.len(), 3);
        let verification = &spec["properties"]["verification"]["enum"];
        assert_eq!(verification, &serde_json::json!(["Required", "Skip"]));
        let policy = &spec["properties"]["dmarc"]["properties"]["policy"]["enum"];
        assert_eq!(policy, &serde_json::json!(["none", "quarantine", "reject"]));
    }

    #[test]
    fn domain_and_selector_patterns_accept_names_and_reject_garbage() {
        use herald_core::resources::{DOMAIN_PATTERN, SELECTOR_PATTERN};
        let domain = regex::Regex::new(DOMAIN_PATTERN).expect("domain regex");
        for ok in ["example.com", "mail.xn--bcher-kva.example.", "a-b.c0.test"] {
            assert!(domain.is_match(ok), "{ok} refused");
        }
        for bad in [
            "example",
            "-bad.example",
            "bad_domain.example",
            "a..b",
            "x.test/evil",
        ] {
            assert!(!domain.is_match(bad), "{bad} accepted");
        }
        let selector = regex::Regex::new(SELECTOR_PATTERN).expect("selector regex");
        for ok in ["herald", "s2024-01", "a.b"] {
            assert!(selector.is_match(ok), "{ok} refused");
        }
        for bad in ["", "sel ector", "sel._domainkey..x", "-x"] {
            assert!(!selector.is_match(bad), "{bad} accepted");
        }
    }
}
