//! The generated CRDs' openAPIV3Schema accepts the resources in `examples/` and rejects
//! broken ones, checked with a validator for the subset of OpenAPI v3 a structural CRD
//! schema uses (type, properties, required, items, enum, pattern, lengths, bounds,
//! nullable). Unknown fields count as errors here: the API server would silently prune
//! them, which hides typos.

use std::path::Path;

use herald_core::resources::{MailDomain, SmtpAccount};
use kube::CustomResourceExt;
use serde::Deserialize;
use serde_json::Value;

fn schema_of(crd: impl serde::Serialize) -> Value {
    let crd = serde_json::to_value(crd).expect("CRD as JSON");
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

fn validate(schema: &Value, v: &Value, path: &str, errors: &mut Vec<String>) {
    if v.is_null() {
        if schema["nullable"] != Value::Bool(true) {
            errors.push(format!("{path}: null is not allowed"));
        }
        return;
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(v)
    {
        errors.push(format!("{path}: {v} is not one of {allowed:?}"));
    }
    match schema["type"].as_str() {
        Some("object") => {
            let Some(obj) = v.as_object() else {
                return errors.push(format!("{path}: not an object"));
            };
            let props = schema["properties"].as_object();
            for (k, child) in obj {
                match props.and_then(|p| p.get(k)) {
                    Some(s) => validate(s, child, &format!("{path}.{k}"), errors),
                    None => errors.push(format!("{path}.{k}: unknown field")),
                }
            }
            for req in schema["required"].as_array().into_iter().flatten() {
                if let Some(r) = req.as_str()
                    && !obj.contains_key(r)
                {
                    errors.push(format!("{path}.{r}: required"));
                }
            }
        }
        Some("array") => match v.as_array() {
            Some(items) => {
                for (i, item) in items.iter().enumerate() {
                    validate(&schema["items"], item, &format!("{path}[{i}]"), errors);
                }
            }
            None => errors.push(format!("{path}: not an array")),
        },
        Some("string") => {
            let Some(s) = v.as_str() else {
                return errors.push(format!("{path}: not a string"));
            };
            if let Some(p) = schema["pattern"].as_str()
                && !regex::Regex::new(p).expect("schema pattern").is_match(s)
            {
                errors.push(format!("{path}: {s:?} does not match {p}"));
            }
            let len = s.chars().count() as u64;
            if schema["minLength"].as_u64().is_some_and(|m| len < m) {
                errors.push(format!("{path}: shorter than minLength"));
            }
            if schema["maxLength"].as_u64().is_some_and(|m| len > m) {
                errors.push(format!("{path}: longer than maxLength"));
            }
        }
        Some("integer") => match v.as_f64() {
            Some(n) if v.is_i64() || v.is_u64() => {
                if schema["minimum"].as_f64().is_some_and(|m| n < m) {
                    errors.push(format!("{path}: below minimum"));
                }
                if schema["maximum"].as_f64().is_some_and(|m| n > m) {
                    errors.push(format!("{path}: above maximum"));
                }
            }
            _ => errors.push(format!("{path}: not an integer")),
        },
        Some("boolean") if !v.is_boolean() => errors.push(format!("{path}: not a boolean")),
        _ => {}
    }
}

/// Errors of a custom resource document against its CRD (its spec and status; apiVersion,
/// kind and metadata are the API server's).
fn errors(doc: &Value) -> Vec<String> {
    let schema = match doc["kind"].as_str() {
        Some("MailDomain") => schema_of(MailDomain::crd()),
        Some("SmtpAccount") => schema_of(SmtpAccount::crd()),
        other => panic!("not a Herald resource: {other:?}"),
    };
    let mut errors = Vec::new();
    for part in ["spec", "status"] {
        if let Some(v) = doc.get(part) {
            validate(&schema["properties"][part], v, part, &mut errors);
        }
    }
    if doc.get("spec").is_none() {
        errors.push("spec: required".into());
    }
    errors
}

fn yaml_docs(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).expect("YAML document"))
        .filter(|v| !v.is_null())
        .collect()
}

#[test]
fn examples_validate_against_the_generated_crds() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read example");
        for doc in yaml_docs(&text) {
            if doc["apiVersion"] != "herald.dev/v1alpha1" {
                continue;
            }
            let errs = errors(&doc);
            assert!(errs.is_empty(), "{}: {errs:?}", path.display());
            checked += 1;
        }
    }
    assert!(
        checked >= 2,
        "examples/ holds a MailDomain and an SmtpAccount"
    );
}

#[test]
fn broken_resources_are_rejected_with_the_field_at_fault() {
    let cases = [
        (
            "apiVersion: herald.dev/v1alpha1\nkind: MailDomain\nspec: {domain: not_a_domain}",
            "spec.domain: \"not_a_domain\" does not match",
        ),
        (
            "apiVersion: herald.dev/v1alpha1\nkind: MailDomain\nspec: {domain: a.test, dkim: {algorithm: rsa-1024}}",
            "spec.dkim.algorithm: \"rsa-1024\" is not one of",
        ),
        (
            "apiVersion: herald.dev/v1alpha1\nkind: MailDomain\nspec: {domain: a.test, dkim: {selector: \"bad selector\"}}",
            "spec.dkim.selector: \"bad selector\" does not match",
        ),
        (
            "apiVersion: herald.dev/v1alpha1\nkind: MailDomain\nspec: {domain: a.test, verification: Maybe}",
            "spec.verification: \"Maybe\" is not one of",
        ),
        (
            "apiVersion: herald.dev/v1alpha1\nkind: MailDomain\nspec: {domain: a.test, dkim: {rotateAfter: soon}}",
            "spec.dkim.rotateAfter: \"soon\" does not match",
        ),
        (
            "apiVersion: herald.dev/v1alpha1\nkind: MailDomain\nspec: {domian: a.test}",
            "spec.domian: unknown field",
        ),
        (
            "apiVersion: herald.dev/v1alpha1\nkind: MailDomain\nspec: {dmarc: {policy: strict}, domain: a.test}",
            "spec.dmarc.policy: \"strict\" is not one of",
        ),
        (
            "apiVersion: herald.dev/v1alpha1\nkind: SmtpAccount\nspec: {allowedDomains: [x]}",
            "spec.passwordSecret: required",
        ),
    ];
    for (yaml, want) in cases {
        let doc = yaml_docs(yaml).remove(0);
        let errs = errors(&doc);
        assert!(
            errs.iter().any(|e| e.starts_with(want)),
            "{yaml}\nwanted {want:?}, got {errs:?}"
        );
    }
}
