//! The files-mode resource directory: exactly the documents a user would `kubectl apply`
//! (MailDomain, SmtpAccount, and their Secrets), as one multi-document YAML file.

use std::path::{Path, PathBuf};

use serde_yaml::{Mapping, Value};

use crate::DkimKey;

const HERALD_API: &str = "herald.dev/v1alpha1";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DkimAlgorithm {
    RsaSha256,
    Ed25519Sha256,
    /// RSA under `selector`, Ed25519 under `ed25519Selector` (default `<selector>-ed25519`).
    Both,
}

impl DkimAlgorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            DkimAlgorithm::RsaSha256 => "rsa-sha256",
            DkimAlgorithm::Ed25519Sha256 => "ed25519-sha256",
            DkimAlgorithm::Both => "both",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verification {
    Required,
    /// Usable without DNS verification (tests and dev).
    Skip,
}

impl Verification {
    pub fn as_str(self) -> &'static str {
        match self {
            Verification::Required => "Required",
            Verification::Skip => "Skip",
        }
    }
}

/// `spec.dkim` of a MailDomain.
#[derive(Clone, Debug)]
pub struct DkimSpec {
    pub selector: String,
    pub algorithm: DkimAlgorithm,
    pub secret_name: String,
    /// Written only when set.
    pub ed25519_selector: Option<String>,
}

/// A set of resource documents, all in one namespace (`default` unless changed).
#[derive(Clone, Debug)]
pub struct Resources {
    namespace: String,
    docs: Vec<Value>,
}

impl Default for Resources {
    fn default() -> Self {
        Resources::new()
    }
}

impl Resources {
    pub fn new() -> Resources {
        Resources::in_namespace("default")
    }

    pub fn in_namespace(namespace: &str) -> Resources {
        Resources {
            namespace: namespace.to_string(),
            docs: Vec::new(),
        }
    }

    /// A MailDomain named `name` for `domain`.
    pub fn mail_domain(
        &mut self,
        name: &str,
        domain: &str,
        dkim: Option<&DkimSpec>,
        verification: Verification,
    ) -> &mut Resources {
        let mut spec = Mapping::new();
        spec.insert(s("domain"), s(domain));
        if let Some(d) = dkim {
            let mut m = Mapping::new();
            m.insert(s("selector"), s(&d.selector));
            m.insert(s("algorithm"), s(d.algorithm.as_str()));
            if let Some(ed) = &d.ed25519_selector {
                m.insert(s("ed25519Selector"), s(ed));
            }
            m.insert(s("secretName"), s(&d.secret_name));
            spec.insert(s("dkim"), Value::Mapping(m));
        }
        spec.insert(s("verification"), s(verification.as_str()));
        let doc = self.object(HERALD_API, "MailDomain", name, &[], spec);
        self.docs.push(doc);
        self
    }

    /// An SmtpAccount `name` (the AUTH username) whose password is key `password_key` of
    /// Secret `password_secret`, allowed to send from the MailDomains `allowed_domains`
    /// (MailDomain names, not DNS names).
    pub fn smtp_account(
        &mut self,
        name: &str,
        password_secret: &str,
        password_key: &str,
        allowed_domains: &[&str],
    ) -> &mut Resources {
        let mut spec = Mapping::new();
        spec.insert(
            s("passwordSecret"),
            map(&[("name", s(password_secret)), ("key", s(password_key))]),
        );
        spec.insert(
            s("allowedDomains"),
            Value::Sequence(allowed_domains.iter().map(|d| s(d)).collect()),
        );
        let doc = self.object(HERALD_API, "SmtpAccount", name, &[], spec);
        self.docs.push(doc);
        self
    }

    /// An Opaque Secret with `stringData`.
    pub fn secret(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        string_data: &[(&str, &str)],
    ) -> &mut Resources {
        let mut doc = Mapping::new();
        doc.insert(s("apiVersion"), s("v1"));
        doc.insert(s("kind"), s("Secret"));
        doc.insert(s("metadata"), self.metadata(name, labels));
        doc.insert(s("type"), s("Opaque"));
        let data: Vec<(&str, Value)> = string_data.iter().map(|(k, v)| (*k, s(v))).collect();
        doc.insert(s("stringData"), map(&data));
        self.docs.push(Value::Mapping(doc));
        self
    }

    /// A signing MailDomain with `verification: Skip` and its DKIM Secret
    /// (`<name>-dkim`, labelled `herald.dev/maildomain: <name>`, keys `rsa-sha256.pem`
    /// and/or `ed25519-sha256.pem`).
    pub fn signing_domain(
        &mut self,
        name: &str,
        domain: &str,
        selector: &str,
        algorithm: DkimAlgorithm,
        rsa: Option<&DkimKey>,
        ed25519: Option<&DkimKey>,
    ) -> &mut Resources {
        let secret_name = format!("{name}-dkim");
        let spec = DkimSpec {
            selector: selector.to_string(),
            algorithm,
            secret_name: secret_name.clone(),
            ed25519_selector: None,
        };
        self.mail_domain(name, domain, Some(&spec), Verification::Skip);
        let mut data = Vec::new();
        if let Some(k) = rsa {
            data.push(("rsa-sha256.pem", k.private_pem.as_str()));
        }
        if let Some(k) = ed25519 {
            data.push(("ed25519-sha256.pem", k.private_pem.as_str()));
        }
        self.secret(&secret_name, &[("herald.dev/maildomain", name)], &data)
    }

    /// An SmtpAccount `name` with its password Secret `<name>-smtp` (key `password`).
    pub fn account_with_password(
        &mut self,
        name: &str,
        password: &str,
        allowed_domains: &[&str],
    ) -> &mut Resources {
        let secret = format!("{name}-smtp");
        self.smtp_account(name, &secret, "password", allowed_domains);
        self.secret(&secret, &[], &[("password", password)])
    }

    /// Merges `spec_yaml` (a YAML mapping, e.g. `{hourlyLimit: 10}`) into the spec of the
    /// SmtpAccount `name` written earlier.
    pub fn account_spec(&mut self, name: &str, spec_yaml: &str) -> &mut Resources {
        self.merge_spec("SmtpAccount", name, spec_yaml)
    }

    /// Merges `spec_yaml` (a YAML mapping, e.g. `{returnPath: bounces.example.test}`) into
    /// the spec of the MailDomain `name` written earlier.
    pub fn domain_spec(&mut self, name: &str, spec_yaml: &str) -> &mut Resources {
        self.merge_spec("MailDomain", name, spec_yaml)
    }

    fn merge_spec(&mut self, kind: &str, name: &str, spec_yaml: &str) -> &mut Resources {
        let extra: Mapping = serde_yaml::from_str(spec_yaml).expect("spec fragment is a mapping");
        let doc = self
            .docs
            .iter_mut()
            .find(|d| d["kind"] == s(kind) && d["metadata"]["name"] == s(name))
            .unwrap_or_else(|| panic!("the {kind} {name} exists"));
        let spec = doc
            .get_mut("spec")
            .and_then(Value::as_mapping_mut)
            .unwrap_or_else(|| panic!("the {kind} {name} has a spec"));
        for (k, v) in extra {
            spec.insert(k, v);
        }
        self
    }

    /// Any other document, as is.
    pub fn document(&mut self, doc: Value) -> &mut Resources {
        self.docs.push(doc);
        self
    }

    /// All documents, `---`-separated.
    pub fn to_yaml(&self) -> String {
        self.docs
            .iter()
            .map(|d| serde_yaml::to_string(d).expect("a YAML value serializes"))
            .collect::<Vec<_>>()
            .join("---\n")
    }

    /// Writes `<dir>/resources.yaml` (creating `dir`) and returns its path.
    pub fn write(&self, dir: &Path) -> PathBuf {
        self.write_as(dir, "resources.yaml")
    }

    pub fn write_as(&self, dir: &Path, file_name: &str) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let path = dir.join(file_name);
        std::fs::write(&path, self.to_yaml())
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    fn metadata(&self, name: &str, labels: &[(&str, &str)]) -> Value {
        let mut m = Mapping::new();
        m.insert(s("name"), s(name));
        m.insert(s("namespace"), s(&self.namespace));
        if !labels.is_empty() {
            let l: Vec<(&str, Value)> = labels.iter().map(|(k, v)| (*k, s(v))).collect();
            m.insert(s("labels"), map(&l));
        }
        Value::Mapping(m)
    }

    fn object(
        &self,
        api_version: &str,
        kind: &str,
        name: &str,
        labels: &[(&str, &str)],
        spec: Mapping,
    ) -> Value {
        let mut doc = Mapping::new();
        doc.insert(s("apiVersion"), s(api_version));
        doc.insert(s("kind"), s(kind));
        doc.insert(s("metadata"), self.metadata(name, labels));
        doc.insert(s("spec"), Value::Mapping(spec));
        Value::Mapping(doc)
    }
}

fn s(v: &str) -> Value {
    Value::String(v.to_string())
}

fn map(entries: &[(&str, Value)]) -> Value {
    let mut m = Mapping::new();
    for (k, v) in entries {
        m.insert(s(k), v.clone());
    }
    Value::Mapping(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_have_the_kubectl_shape() {
        let key = DkimKey {
            private_pem: "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".into(),
            dns_txt: "v=DKIM1; k=rsa; p=AAAA".into(),
        };
        let mut r = Resources::new();
        r.signing_domain(
            "example-test",
            "example.test",
            "herald",
            DkimAlgorithm::RsaSha256,
            Some(&key),
            None,
        )
        .account_with_password("app", "s3cret", &["example-test"]);
        let yaml = r.to_yaml();
        // Separators are "---" lines at column 0; the PEM lines (containing "-----") are
        // indented inside a block scalar.
        let docs: Vec<Value> = yaml
            .split("\n---\n")
            .map(|d| serde_yaml::from_str(&format!("{d}\n")).expect("each document parses"))
            .collect();
        assert_eq!(docs.len(), 4);
        assert_eq!(docs[0]["kind"], s("MailDomain"));
        assert_eq!(docs[0]["apiVersion"], s("herald.dev/v1alpha1"));
        assert_eq!(docs[0]["spec"]["dkim"]["algorithm"], s("rsa-sha256"));
        assert_eq!(
            docs[0]["spec"]["dkim"]["secretName"],
            s("example-test-dkim")
        );
        assert_eq!(docs[0]["spec"]["verification"], s("Skip"));
        assert_eq!(
            docs[1]["metadata"]["labels"]["herald.dev/maildomain"],
            s("example-test")
        );
        assert_eq!(docs[1]["stringData"]["rsa-sha256.pem"], s(&key.private_pem));
        assert_eq!(docs[2]["spec"]["passwordSecret"]["name"], s("app-smtp"));
        assert_eq!(docs[2]["spec"]["allowedDomains"][0], s("example-test"));
        assert_eq!(docs[3]["stringData"]["password"], s("s3cret"));
        assert_eq!(docs[3]["metadata"]["namespace"], s("default"));
    }
}
