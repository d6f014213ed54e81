//! A MailDomain's observed state: its DKIM keys, the verdict on each DNS record, and the
//! conditions the data plane reads. Shared by the reconciler and `herald domain check`, so
//! both say exactly the same thing about a domain.

use std::{collections::BTreeMap, fmt::Write as _};

use herald_core::resources::{
    Condition, DKIM_SECRET_LABEL, DkimAlgorithm, KeyRole, MailDomain, MailDomainStatus,
    RecordPurpose, RecordState, SelectorStatus, Verification,
};

use crate::{
    dkim::{self, PublicKey},
    dns::Lookup,
    records::{self, DnsPolicy, Expectations},
    rotation,
};

pub const READY: &str = "Ready";
pub const DKIM_KEY_READY: &str = "DkimKeyReady";
pub const DNS_VERIFIED: &str = "DnsVerified";

/// The DKIM selectors of `md` with their public keys, read from the Secret's data
/// (key name -> PEM): per algorithm the active key, then a rotation's next and previous
/// keys when present (see [`crate::rotation`]). `Err` says which key is missing or unusable.
pub fn selectors(
    md: &MailDomain,
    secret: Option<&BTreeMap<String, String>>,
    secret_name: &str,
) -> Result<Vec<(SelectorStatus, PublicKey)>, String> {
    let Some(data) = secret else {
        return Err(format!("DKIM Secret {secret_name} does not exist"));
    };
    let domain = domain_name(md);
    let entry = |prefix: &str, algorithm: DkimAlgorithm, role: KeyRole, selector: String| {
        let name = format!("{prefix}{}", algorithm.secret_key());
        let pem = data
            .get(&name)
            .ok_or_else(|| format!("DKIM Secret {secret_name} has no {name} key"))?;
        let key = PublicKey::from_private_pem(algorithm, pem)
            .map_err(|e| format!("DKIM Secret {secret_name}: {name}: {e}"))?;
        let value = key.txt_value();
        Ok::<_, String>((
            SelectorStatus {
                name: format!("{selector}._domainkey.{domain}"),
                selector,
                role,
                algorithm,
                strings: dkim::split_strings(&value),
                value,
            },
            key,
        ))
    };
    let mut out = Vec::new();
    for (spec_selector, algorithm) in md.spec.dkim.keys() {
        let active = data
            .get(algorithm.selector_key())
            .map(|s| s.trim().to_string())
            .unwrap_or(spec_selector);
        out.push(entry("", algorithm, KeyRole::Active, active)?);
        for (prefix, role) in [
            (rotation::NEXT, KeyRole::Next),
            (rotation::PREVIOUS, KeyRole::Previous),
        ] {
            if let Some(selector) = data.get(&format!("{prefix}{}", algorithm.selector_key())) {
                out.push(entry(prefix, algorithm, role, selector.trim().to_string())?);
            }
        }
    }
    Ok(out)
}

/// `spec.domain` as DNS names are compared: lower case, no trailing dot.
pub fn domain_name(md: &MailDomain) -> String {
    md.spec.domain.trim_end_matches('.').to_ascii_lowercase()
}

/// Everything needed to compute one status.
pub struct Observation<'a> {
    pub md: &'a MailDomain,
    /// The DKIM Secret's data (key -> PEM), `None` when it does not exist.
    pub secret: Option<&'a BTreeMap<String, String>>,
    pub secret_name: &'a str,
    /// The ownership token to expect, if this domain has one (it has a uid).
    pub ownership_token: Option<String>,
    /// RFC 3339 time of this check.
    pub now: String,
    /// The Secret carries the `herald.dev/maildomain` label. Ingress and delivery read only
    /// labelled Secrets, so an unlabelled one (made by a user) signs nothing.
    pub secret_labelled: bool,
}

/// Checks DNS and builds the status to write. Conditions keep their previous
/// `lastTransitionTime` while their status does not change.
pub async fn observe(
    lookup: &dyn Lookup,
    policy: &DnsPolicy,
    obs: Observation<'_>,
) -> MailDomainStatus {
    let md = obs.md;
    let generation = md.metadata.generation;
    let keys = selectors(md, obs.secret, obs.secret_name);
    let (selector_rows, public_keys): (Vec<SelectorStatus>, _) = match &keys {
        Ok(k) => (k.iter().map(|(s, _)| s.clone()).collect(), k.clone()),
        Err(_) => (Vec::new(), Vec::new()),
    };
    let exp = Expectations {
        domain: domain_name(md),
        dkim: public_keys,
        ownership_token: obs.ownership_token,
        return_path: md.spec.return_path.clone(),
        dmarc: md.spec.dmarc.policy,
        mx: md.spec.mx.clone(),
    };
    let rows = records::verify(lookup, policy, &exp).await;
    let previous = md.status.as_ref().map(|s| s.conditions.as_slice());
    let cond = |type_: &str, ok: bool, reason: &str, message: String| {
        condition(type_, ok, reason, message, generation, &obs.now, previous)
    };

    let key_cond = match &keys {
        Ok(_) if !obs.secret_labelled => cond(
            DKIM_KEY_READY,
            false,
            "SecretNotLabelled",
            format!(
                "Secret {0} has the keys but not the label {DKIM_SECRET_LABEL}, so ingress \
                 and delivery cannot read it: kubectl label secret {0} {DKIM_SECRET_LABEL}={1} \
                 (the operator then also manages its keys: missing ones added, rotation)",
                obs.secret_name,
                md.metadata.name.as_deref().unwrap_or_default()
            ),
        ),
        Ok(k) => cond(
            DKIM_KEY_READY,
            true,
            "KeysPresent",
            format!(
                "signing with {}",
                k.iter()
                    .filter(|(s, _)| s.role == KeyRole::Active)
                    .map(|(s, _)| format!("{} ({})", s.selector, s.algorithm.as_str()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        Err(e) => cond(DKIM_KEY_READY, false, "KeyMissing", e.clone()),
    };
    // PTR rows are the installation's, reported on every domain but not held against it;
    // a rotation's next and previous records do not decide whether mail may flow either.
    let informational: Vec<&str> = selector_rows
        .iter()
        .filter(|s: &&SelectorStatus| s.role != KeyRole::Active)
        .map(|s| s.name.as_str())
        .collect();
    let gating = || {
        rows.iter().filter(|r| {
            r.purpose != RecordPurpose::Ptr
                && !(r.purpose == RecordPurpose::Dkim && informational.contains(&r.name.as_str()))
        })
    };
    let pending: Vec<String> = gating()
        .filter(|r| r.state != RecordState::Verified)
        .map(|r| format!("{} {} {}: {}", r.type_, r.name, r.state.as_str(), r.message))
        .collect();
    let dns_cond = if keys.is_err() {
        cond(
            DNS_VERIFIED,
            false,
            "KeyMissing",
            "the DKIM record cannot be checked without the key".into(),
        )
    } else if pending.is_empty() {
        cond(
            DNS_VERIFIED,
            true,
            "AllRecordsVerified",
            format!("{} records verified", gating().count()),
        )
    } else if gating().any(|r| r.state == RecordState::Error) {
        cond(DNS_VERIFIED, false, "LookupFailed", pending.join("; "))
    } else {
        cond(
            DNS_VERIFIED,
            false,
            "RecordsNotVerified",
            pending.join("; "),
        )
    };
    let ready_cond = match (md.spec.verification, &key_cond, &dns_cond) {
        (_, k, _) if k.status != "True" => cond(READY, false, &k.reason, k.message.clone()),
        (Verification::Skip, _, _) => cond(
            READY,
            true,
            "VerificationSkipped",
            "DKIM keys present; DNS verification skipped (spec.verification: Skip)".into(),
        ),
        (Verification::Required, _, d) if d.status == "True" => cond(
            READY,
            true,
            "Verified",
            "DKIM keys present and every DNS record verified".into(),
        ),
        (Verification::Required, _, d) => cond(READY, false, &d.reason, d.message.clone()),
    };

    MailDomainStatus {
        conditions: vec![key_cond, dns_cond, ready_cond],
        observed_generation: generation,
        dkim_secret: Some(obs.secret_name.to_string()),
        selectors: selector_rows,
        summary: Some(records::summarize(&rows)),
        records: rows,
        last_check_time: Some(obs.now),
    }
}

/// A condition; its transition time is carried over from `previous` when the status is
/// the same, so it says when the state changed, not when it was last checked.
pub fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &str,
    previous: Option<&[Condition]>,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let since = previous
        .and_then(|p| p.iter().find(|c| c.type_ == type_))
        .filter(|c| c.status == status)
        .and_then(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.to_string());
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        last_transition_time: Some(since),
        observed_generation: generation,
    }
}

/// True when the status lets mail flow (the data plane's rule: `Ready=True`).
pub fn is_ready(status: &MailDomainStatus) -> bool {
    status
        .conditions
        .iter()
        .any(|c| c.type_ == READY && c.status == "True")
}

/// The status as a table for people: one block per record with what to publish.
pub fn render(domain: &str, status: &MailDomainStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "MailDomain {domain}");
    for c in &status.conditions {
        let _ = writeln!(
            out,
            "  {:<13} {:<6} {}: {}",
            c.type_, c.status, c.reason, c.message
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "{:<11} {:<6} {:<9} NAME", "RECORD", "TYPE", "STATE");
    for r in &status.records {
        let purpose = serde_json::to_value(r.purpose)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<11} {:<6} {:<9} {}",
            purpose,
            r.type_,
            r.state.as_str(),
            r.name
        );
        let _ = writeln!(out, "    expected: {}", r.expected);
        for o in &r.observed {
            let _ = writeln!(out, "    observed: {o}");
        }
        if !r.message.is_empty() {
            let _ = writeln!(out, "    {}", r.message);
        }
    }
    for s in &status.selectors {
        if s.strings.len() > 1 {
            let quoted: Vec<String> = s.strings.iter().map(|p| format!("\"{p}\"")).collect();
            let _ = writeln!(
                out,
                "\n{} ({}) as 255-octet strings:\n    {}",
                s.name,
                s.algorithm.as_str(),
                quoted.join(" ")
            );
        }
    }
    out
}

/// A change worth a Kubernetes Event: a record verified or lost, readiness gained or lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub warning: bool,
    /// PascalCase: `RecordVerified`, `RecordLost`, `Ready`, `NotReady`.
    pub reason: &'static str,
    /// What was checked (`Verify TXT <name>`, `Reconcile`). Events of one action and reason
    /// are folded into a series by the recorder, so each record gets its own action and one
    /// record's note never hides another's.
    pub action: String,
    pub note: String,
}

/// What changed between the previous status and the new one. Only changes count: a record
/// that was never verified is not "lost", and a first check reports what it verified.
pub fn transitions(previous: Option<&MailDomainStatus>, new: &MailDomainStatus) -> Vec<Transition> {
    let mut out = Vec::new();
    let before = |purpose, name: &str| {
        previous.and_then(|p| {
            p.records
                .iter()
                .find(|r| r.purpose == purpose && r.name == name)
                .map(|r| r.state)
        })
    };
    for r in &new.records {
        let was = before(r.purpose, &r.name);
        let label = format!("{} {}", r.type_, r.name);
        let action = format!("Verify {label}");
        match (was, r.state) {
            (Some(RecordState::Verified), RecordState::Verified) => {}
            (_, RecordState::Verified) => out.push(Transition {
                warning: false,
                reason: "RecordVerified",
                action,
                note: format!("{label}: {}", r.message),
            }),
            (Some(RecordState::Verified), now) => out.push(Transition {
                warning: true,
                reason: "RecordLost",
                action,
                note: format!("{label}: {}: {}", now.as_str(), r.message),
            }),
            _ => {}
        }
    }
    let ready = |s: &MailDomainStatus| {
        s.conditions
            .iter()
            .find(|c| c.type_ == READY)
            .map(|c| (c.status == "True", c.message.clone()))
    };
    match (previous.and_then(ready), ready(new)) {
        (Some((false, _)) | None, Some((true, message))) => out.push(Transition {
            warning: false,
            reason: "Ready",
            action: "Reconcile".into(),
            note: message,
        }),
        (Some((true, _)), Some((false, message))) => out.push(Transition {
            warning: true,
            reason: "NotReady",
            action: "Reconcile".into(),
            note: message,
        }),
        _ => {}
    }
    out
}

/// Keys the Secret must hold for `md` and which of them are missing from `data`.
pub fn missing_keys(
    md: &MailDomain,
    data: &BTreeMap<String, String>,
) -> Vec<(&'static str, DkimAlgorithm)> {
    md.spec
        .dkim
        .keys()
        .into_iter()
        .map(|(_, a)| (a.secret_key(), a))
        .filter(|(k, _)| !data.contains_key(*k))
        .collect()
}

#[cfg(test)]
mod tests {
    use herald_core::resources::{DnsRecordStatus, RecordPurpose};

    use super::*;

    #[test]
    fn table_shows_each_record_with_expected_observed_and_why() {
        let long = format!("v=DKIM1; k=rsa; p={}", "A".repeat(300));
        let status = MailDomainStatus {
            conditions: vec![condition(
                READY,
                false,
                "RecordsNotVerified",
                "TXT _dmarc.example.test Missing".into(),
                Some(1),
                "2026-11-28T09:00:00Z",
                None,
            )],
            selectors: vec![SelectorStatus {
                selector: "s1".into(),
                role: KeyRole::Active,
                algorithm: DkimAlgorithm::RsaSha256,
                name: "s1._domainkey.example.test".into(),
                strings: dkim::split_strings(&long),
                value: long.clone(),
            }],
            records: vec![DnsRecordStatus {
                purpose: RecordPurpose::Dmarc,
                type_: "TXT".into(),
                name: "_dmarc.example.test".into(),
                expected: "v=DMARC1; p=quarantine".into(),
                observed: vec!["v=DMARC1; p=none".into()],
                state: RecordState::Mismatch,
                message: "p=none is weaker than the quarantine asked for".into(),
            }],
            ..MailDomainStatus::default()
        };
        let table = render("example.test", &status);
        let expected = format!(
            "MailDomain example.test\n\
             \x20 Ready         False  RecordsNotVerified: TXT _dmarc.example.test Missing\n\
             \n\
             RECORD      TYPE   STATE     NAME\n\
             DMARC       TXT    Mismatch  _dmarc.example.test\n\
             \x20   expected: v=DMARC1; p=quarantine\n\
             \x20   observed: v=DMARC1; p=none\n\
             \x20   p=none is weaker than the quarantine asked for\n\
             \n\
             s1._domainkey.example.test (rsa-sha256) as 255-octet strings:\n\
             \x20   \"{}\" \"{}\"\n",
            &long[..255],
            &long[255..]
        );
        assert_eq!(table, expected);
    }

    #[test]
    fn transition_time_is_kept_while_the_status_is_unchanged() {
        let before = condition(READY, true, "Verified", String::new(), Some(1), "T0", None);
        let again = condition(
            READY,
            true,
            "Verified",
            String::new(),
            Some(2),
            "T1",
            Some(std::slice::from_ref(&before)),
        );
        assert_eq!(again.last_transition_time.as_deref(), Some("T0"));
        let flipped = condition(
            READY,
            false,
            "RecordsNotVerified",
            String::new(),
            Some(2),
            "T2",
            Some(&[before]),
        );
        assert_eq!(flipped.last_transition_time.as_deref(), Some("T2"));
    }
}
