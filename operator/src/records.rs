//! The DNS records a MailDomain must publish, and the verdict on each one: the rules of
//! DKIM (RFC 6376 / 8463), SPF (RFC 7208), DMARC (RFC 7489), the return-path host, MX and
//! the ownership token, applied to what a [`Lookup`] answers.

use std::net::IpAddr;

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use futures::future::join_all;
use herald_core::resources::{
    DmarcPolicy, DnsRecordStatus, RecordPurpose, RecordState, RecordSummary, SelectorStatus,
};
use ipnet::IpNet;
use sha2::{Digest, Sha256};

use crate::{
    dkim::PublicKey,
    dns::{Lookup, LookupError},
};

/// Where the ownership token TXT record lives, under the domain.
pub const OWNERSHIP_LABEL: &str = "_herald-challenge";

/// What the installation requires of every domain's records (operator configuration).
#[derive(Debug, Clone, Default)]
pub struct DnsPolicy {
    /// Source addresses Herald sends from: SPF must authorise each one (`ip4:`/`ip6:`)...
    pub egress_ips: Vec<IpAddr>,
    /// ...or include this domain's SPF record (`include:<this>`), which then must list them.
    pub spf_include: Option<String>,
    /// How a MailDomain's `returnPath` host must point at Herald's bounce receiver.
    pub return_path: Option<ReturnPathTarget>,
    /// Egress IPs with the EHLO name they greet with: each must have forward-confirmed
    /// reverse DNS (PTR to the name, the name resolving back to the IP).
    pub egress_names: Vec<(IpAddr, String)>,
}

/// The record a return-path host must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReturnPathTarget {
    /// `CNAME <host>`.
    Cname(String),
    /// `MX <host>` among its MX records.
    Mx(String),
}

/// Everything one domain is expected to publish.
#[derive(Debug, Clone)]
pub struct Expectations {
    /// Lower case, no trailing dot.
    pub domain: String,
    /// Each DKIM key with its selector row.
    pub dkim: Vec<(SelectorStatus, PublicKey)>,
    /// `herald-verification=<token>` at `_herald-challenge.<domain>`, when known.
    pub ownership_token: Option<String>,
    pub return_path: Option<String>,
    pub dmarc: DmarcPolicy,
    pub mx: Vec<String>,
}

/// The ownership token of a MailDomain: derived from its uid, which the API server assigns
/// at random and other tenants cannot read, so publishing it proves control of the zone.
/// Nothing needs storing: the same uid always gives the same token.
pub fn ownership_token(uid: &str) -> String {
    let digest = Sha256::digest(format!("herald.dev/maildomain-ownership:{uid}"));
    hex::encode(&digest[..16])
}

/// Checks every expected record (concurrently) and returns one row per record, in a fixed
/// order: ownership, DKIM by selector, SPF, DMARC, return path, MX, egress PTRs.
pub async fn verify(
    lookup: &dyn Lookup,
    policy: &DnsPolicy,
    exp: &Expectations,
) -> Vec<DnsRecordStatus> {
    let mut checks: Vec<futures::future::BoxFuture<'_, DnsRecordStatus>> = Vec::new();
    if let Some(token) = &exp.ownership_token {
        checks.push(Box::pin(check_ownership(lookup, &exp.domain, token)));
    }
    for (selector, key) in &exp.dkim {
        checks.push(Box::pin(check_dkim(lookup, selector, key)));
    }
    checks.push(Box::pin(check_spf(lookup, policy, &exp.domain)));
    checks.push(Box::pin(check_dmarc(lookup, &exp.domain, exp.dmarc)));
    if let (Some(host), Some(target)) = (&exp.return_path, &policy.return_path) {
        checks.push(Box::pin(check_return_path(lookup, host, target)));
    }
    if !exp.mx.is_empty() {
        checks.push(Box::pin(check_mx(lookup, &exp.domain, &exp.mx)));
    }
    for (ip, name) in &policy.egress_names {
        checks.push(Box::pin(check_ptr(lookup, *ip, name)));
    }
    join_all(checks).await
}

/// The worst state of each kind of record, for the printer columns.
pub fn summarize(rows: &[DnsRecordStatus]) -> RecordSummary {
    let worst = |purpose: RecordPurpose| {
        rows.iter()
            .filter(|r| r.purpose == purpose)
            .map(|r| r.state)
            .max()
    };
    RecordSummary {
        dkim: worst(RecordPurpose::Dkim),
        spf: worst(RecordPurpose::Spf),
        dmarc: worst(RecordPurpose::Dmarc),
        mx: worst(RecordPurpose::Mx),
    }
}

fn row(purpose: RecordPurpose, type_: &str, name: &str, expected: String) -> DnsRecordStatus {
    DnsRecordStatus {
        purpose,
        type_: type_.into(),
        name: name.into(),
        expected,
        observed: Vec::new(),
        state: RecordState::Missing,
        message: String::new(),
    }
}

/// Verdicts on a row (an extension trait: the row type lives in herald-core).
trait RowExt {
    fn set(self, state: RecordState, message: impl Into<String>) -> DnsRecordStatus;
    /// The verdict when the lookup itself gave no records: `Missing` or `Error`.
    fn lookup_failed(self, err: LookupError) -> DnsRecordStatus;
}

impl RowExt for DnsRecordStatus {
    fn set(mut self, state: RecordState, message: impl Into<String>) -> DnsRecordStatus {
        self.state = state;
        self.message = message.into();
        self
    }

    fn lookup_failed(self, err: LookupError) -> DnsRecordStatus {
        let name = self.name.clone();
        match err {
            LookupError::NotFound(t) => self.set(
                RecordState::Missing,
                format!("no {t} record at {name}: publish the expected value"),
            ),
            LookupError::Failed(e) => {
                self.set(RecordState::Error, format!("DNS lookup failed: {e}"))
            }
        }
    }
}

async fn check_ownership(lookup: &dyn Lookup, domain: &str, token: &str) -> DnsRecordStatus {
    let name = format!("{OWNERSHIP_LABEL}.{domain}");
    let expected = format!("herald-verification={token}");
    let mut r = row(RecordPurpose::Ownership, "TXT", &name, expected.clone());
    let txts = match lookup.txt(&name).await {
        Ok(t) => t,
        Err(e) => return r.lookup_failed(e),
    };
    r.observed = txts
        .iter()
        .filter(|t| t.starts_with("herald-verification="))
        .cloned()
        .collect();
    if txts.iter().any(|t| t.trim() == expected) {
        r.set(RecordState::Verified, "ownership token published")
    } else if r.observed.is_empty() {
        r.set(
            RecordState::Missing,
            format!("no herald-verification record at {name}"),
        )
    } else {
        r.set(
            RecordState::Mismatch,
            "herald-verification value differs from this MailDomain's token",
        )
    }
}

/// Tags of a `tag=value; ...` record (DKIM key records, DMARC), names lower-cased.
fn tags(record: &str) -> Vec<(String, String)> {
    record
        .split(';')
        .filter_map(|t| {
            let (k, v) = t.split_once('=')?;
            Some((k.trim().to_ascii_lowercase(), v.trim().to_string()))
        })
        .collect()
}

fn tag<'a>(tags: &'a [(String, String)], name: &str) -> Option<&'a str> {
    tags.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

async fn check_dkim(
    lookup: &dyn Lookup,
    selector: &SelectorStatus,
    key: &PublicKey,
) -> DnsRecordStatus {
    let r = row(
        RecordPurpose::Dkim,
        "TXT",
        &selector.name,
        selector.value.clone(),
    );
    let txts = match lookup.txt(&selector.name).await {
        Ok(t) => t,
        Err(e) => return r.lookup_failed(e),
    };
    // A key record is one with a p= tag; anything else at the name (stray verification
    // strings) is not a DKIM key and is not shown.
    let records: Vec<&String> = txts
        .iter()
        .filter(|t| tag(&tags(t), "p").is_some())
        .collect();
    let mut r = r;
    r.observed = records.iter().map(|s| s.to_string()).collect();
    let [record] = records.as_slice() else {
        if records.is_empty() {
            return r.set(
                RecordState::Missing,
                format!("no DKIM key record (p=) at {}", selector.name),
            );
        }
        return r.set(
            RecordState::Mismatch,
            format!(
                "{} key records at {}: verifiers may pick any, publish exactly one",
                records.len(),
                selector.name
            ),
        );
    };
    let t = tags(record);
    if let Some(v) = tag(&t, "v")
        && v != "DKIM1"
    {
        return r.set(
            RecordState::Mismatch,
            format!("v={v} where DKIM1 is required"),
        );
    }
    let k = tag(&t, "k").unwrap_or("rsa").to_ascii_lowercase();
    if k != key.key_type {
        return r.set(
            RecordState::Mismatch,
            format!("k={k} published, the key in the Secret is {}", key.key_type),
        );
    }
    let p: String = tag(&t, "p")
        .unwrap_or_default()
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    if p.is_empty() {
        return r.set(RecordState::Mismatch, "key revoked (empty p=)");
    }
    match B64.decode(p.as_bytes()) {
        Ok(der) if key.matches(&der) => r.set(RecordState::Verified, "public key matches"),
        Ok(_) => r.set(
            RecordState::Mismatch,
            "published public key differs from the key in the DKIM Secret",
        ),
        Err(e) => r.set(
            RecordState::Mismatch,
            format!("p= is not valid base64: {e}"),
        ),
    }
}

fn is_spf(txt: &str) -> bool {
    let lower = txt.to_ascii_lowercase();
    lower == "v=spf1" || lower.starts_with("v=spf1 ")
}

/// What an SPF record says about our senders: the include and the networks it passes
/// before any `all` (mechanisms after `all` are never evaluated, RFC 7208 5.1).
struct SpfPasses {
    includes: Vec<String>,
    nets: Vec<IpNet>,
    pass_all: bool,
}

fn spf_passes(record: &str) -> SpfPasses {
    let mut out = SpfPasses {
        includes: Vec::new(),
        nets: Vec::new(),
        pass_all: false,
    };
    for term in record.split_whitespace().skip(1) {
        let (qualifier, mech) = match term.chars().next() {
            Some(q @ ('+' | '-' | '~' | '?')) => (q, &term[1..]),
            _ => ('+', term),
        };
        let lower = mech.to_ascii_lowercase();
        if lower == "all" {
            out.pass_all = qualifier == '+';
            break;
        }
        if qualifier != '+' {
            continue;
        }
        if let Some(d) = lower.strip_prefix("include:") {
            out.includes.push(d.trim_end_matches('.').to_string());
        } else if let Some(net) = lower
            .strip_prefix("ip4:")
            .or_else(|| lower.strip_prefix("ip6:"))
        {
            let parsed = net
                .parse::<IpNet>()
                .or_else(|_| net.parse::<IpAddr>().map(IpNet::from));
            if let Ok(n) = parsed {
                out.nets.push(n);
            }
        }
    }
    out
}

fn spf_expected(policy: &DnsPolicy) -> String {
    if policy.spf_include.is_none() && policy.egress_ips.is_empty() {
        // Nothing to require: do not suggest a record that authorises no one.
        return "one v=spf1 record listing the hosts that send for the domain".into();
    }
    let mut terms = vec!["v=spf1".to_string()];
    if let Some(inc) = &policy.spf_include {
        terms.push(format!("include:{inc}"));
    } else {
        for ip in &policy.egress_ips {
            match ip {
                IpAddr::V4(v4) => terms.push(format!("ip4:{v4}")),
                IpAddr::V6(v6) => terms.push(format!("ip6:{v6}")),
            }
        }
    }
    terms.push("~all".into());
    terms.join(" ")
}

async fn check_spf(lookup: &dyn Lookup, policy: &DnsPolicy, domain: &str) -> DnsRecordStatus {
    let r = row(RecordPurpose::Spf, "TXT", domain, spf_expected(policy));
    let txts = match lookup.txt(domain).await {
        Ok(t) => t,
        Err(e) => return r.lookup_failed(e),
    };
    let mut r = r;
    let records: Vec<&String> = txts.iter().filter(|t| is_spf(t)).collect();
    r.observed = records.iter().map(|s| s.to_string()).collect();
    let [record] = records.as_slice() else {
        if records.is_empty() {
            return r.set(
                RecordState::Missing,
                format!("no v=spf1 record at {domain}"),
            );
        }
        return r.set(
            RecordState::Mismatch,
            format!(
                "{} SPF records at {domain}: RFC 7208 allows one (receivers answer permerror)",
                records.len()
            ),
        );
    };
    let passes = spf_passes(record);
    if passes.pass_all {
        return r.set(
            RecordState::Mismatch,
            "+all authorises every host on the internet: end the record with ~all or -all",
        );
    }
    if let Some(inc) = &policy.spf_include
        && passes
            .includes
            .iter()
            .any(|i| i.eq_ignore_ascii_case(inc.trim_end_matches('.')))
    {
        return r.set(RecordState::Verified, format!("includes {inc}"));
    }
    if policy.egress_ips.is_empty() {
        if let Some(inc) = &policy.spf_include {
            return r.set(
                RecordState::Mismatch,
                format!("include:{inc} missing (or after the all mechanism)"),
            );
        }
        return r.set(
            RecordState::Verified,
            "SPF record present (no egress IPs or include configured to check it against)",
        );
    }
    let uncovered: Vec<String> = policy
        .egress_ips
        .iter()
        .filter(|ip| !passes.nets.iter().any(|n| n.contains(*ip)))
        .map(|ip| ip.to_string())
        .collect();
    if uncovered.is_empty() {
        r.set(RecordState::Verified, "authorises every egress IP")
    } else {
        r.set(
            RecordState::Mismatch,
            format!("does not authorise {}", uncovered.join(", ")),
        )
    }
}

async fn check_dmarc(lookup: &dyn Lookup, domain: &str, asked: DmarcPolicy) -> DnsRecordStatus {
    let name = format!("_dmarc.{domain}");
    let r = row(
        RecordPurpose::Dmarc,
        "TXT",
        &name,
        format!("v=DMARC1; p={}", asked.as_str()),
    );
    let txts = match lookup.txt(&name).await {
        Ok(t) => t,
        Err(e) => return r.lookup_failed(e),
    };
    let mut r = r;
    let records: Vec<&String> = txts
        .iter()
        .filter(|t| {
            tags(t)
                .first()
                .is_some_and(|(k, v)| k == "v" && v == "DMARC1")
        })
        .collect();
    r.observed = records.iter().map(|s| s.to_string()).collect();
    let [record] = records.as_slice() else {
        if records.is_empty() {
            return r.set(
                RecordState::Missing,
                format!("no v=DMARC1 record at {name}"),
            );
        }
        return r.set(
            RecordState::Mismatch,
            format!(
                "{} DMARC records at {name}: receivers then apply none (RFC 7489 6.6.3)",
                records.len()
            ),
        );
    };
    let t = tags(record);
    let Some(p) = tag(&t, "p") else {
        return r.set(RecordState::Mismatch, "no p= tag");
    };
    match DmarcPolicy::parse(p) {
        None => r.set(
            RecordState::Mismatch,
            format!("p={p} is not a DMARC policy"),
        ),
        Some(published) if published < asked => r.set(
            RecordState::Mismatch,
            format!(
                "p={} is weaker than the {} asked for",
                published.as_str(),
                asked.as_str()
            ),
        ),
        Some(published) => r.set(
            RecordState::Verified,
            format!("p={} (at least {})", published.as_str(), asked.as_str()),
        ),
    }
}

async fn check_return_path(
    lookup: &dyn Lookup,
    host: &str,
    target: &ReturnPathTarget,
) -> DnsRecordStatus {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let (type_, want, answer) = match target {
        ReturnPathTarget::Cname(t) => ("CNAME", t, lookup.cname(&host).await),
        ReturnPathTarget::Mx(t) => ("MX", t, lookup.mx(&host).await),
    };
    let want = want.trim_end_matches('.').to_ascii_lowercase();
    let mut r = row(RecordPurpose::ReturnPath, type_, &host, want.clone());
    match answer {
        Err(e) => r.lookup_failed(e),
        Ok(observed) => {
            r.observed = observed;
            if r.observed.contains(&want) {
                r.set(RecordState::Verified, format!("points at {want}"))
            } else {
                r.set(
                    RecordState::Mismatch,
                    format!("{type_} does not point at {want}: bounces would not reach Herald"),
                )
            }
        }
    }
}

async fn check_mx(lookup: &dyn Lookup, domain: &str, hosts: &[String]) -> DnsRecordStatus {
    let wanted: Vec<String> = hosts
        .iter()
        .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
        .collect();
    let mut r = row(RecordPurpose::Mx, "MX", domain, wanted.join(", "));
    match lookup.mx(domain).await {
        Err(e) => r.lookup_failed(e),
        Ok(observed) => {
            r.observed = observed;
            let missing: Vec<&str> = wanted
                .iter()
                .filter(|h| !r.observed.contains(h))
                .map(|h| h.as_str())
                .collect();
            if missing.is_empty() {
                r.set(RecordState::Verified, "every expected MX host is published")
            } else {
                let message = format!("MX host(s) missing: {}", missing.join(", "));
                r.set(RecordState::Mismatch, message)
            }
        }
    }
}

async fn check_ptr(lookup: &dyn Lookup, ip: IpAddr, ehlo: &str) -> DnsRecordStatus {
    let ehlo = ehlo.trim_end_matches('.').to_ascii_lowercase();
    let mut r = row(
        RecordPurpose::Ptr,
        "PTR",
        &crate::dns::reverse_name(ip),
        ehlo.clone(),
    );
    match lookup.ptr(ip).await {
        Err(e) => return r.lookup_failed(e),
        Ok(names) => r.observed = names,
    }
    if !r.observed.contains(&ehlo) {
        let message = format!("{ip} does not point back at its EHLO name {ehlo}");
        return r.set(RecordState::Mismatch, message);
    }
    // Forward confirmation: the name must resolve to the IP again (FCrDNS).
    match lookup.addrs(&ehlo).await {
        Ok(addrs) if addrs.contains(&ip) => r.set(
            RecordState::Verified,
            format!("{ip} <-> {ehlo} (forward-confirmed)"),
        ),
        Ok(addrs) => {
            let list: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
            let message = format!("{ehlo} resolves to {}, not {ip}", list.join(", "));
            r.set(RecordState::Mismatch, message)
        }
        Err(LookupError::NotFound(_)) => r.set(
            RecordState::Mismatch,
            format!("{ehlo} has no A/AAAA record: the PTR is not forward-confirmed"),
        ),
        Err(LookupError::Failed(e)) => r.set(RecordState::Error, format!("DNS lookup failed: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spf_mechanisms_after_all_do_not_count() {
        let p = spf_passes("v=spf1 -all ip4:192.0.2.1");
        assert!(p.nets.is_empty());
        let p = spf_passes("v=spf1 ip4:192.0.2.0/24 ~ip4:198.51.100.1 include:_spf.x.test ~all");
        assert_eq!(p.nets.len(), 1, "softfail mechanisms do not authorise");
        assert_eq!(p.includes, vec!["_spf.x.test"]);
        assert!(!p.pass_all);
    }

    #[test]
    fn ownership_token_is_stable_per_uid_and_differs_between_uids() {
        assert_eq!(ownership_token("a"), ownership_token("a"));
        assert_ne!(ownership_token("a"), ownership_token("b"));
        assert_eq!(ownership_token("a").len(), 32);
    }
}
