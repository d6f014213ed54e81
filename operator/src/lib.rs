//! Herald's Kubernetes operator. For now: the CustomResourceDefinitions of `MailDomain` and
//! `SmtpAccount`, generated from the Rust types in `herald-core` (one source of truth).

use herald_core::resources::{MailDomain, SmtpAccount};
use kube::CustomResourceExt;

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

    #[test]
    fn crds_name_group_version_and_status() {
        let yaml = crds_yaml().expect("yaml");
        assert!(yaml.contains("name: maildomains.herald.dev"));
        assert!(yaml.contains("name: smtpaccounts.herald.dev"));
        assert!(yaml.contains("v1alpha1"));
        assert!(yaml.contains("status: {}"));
    }
}
