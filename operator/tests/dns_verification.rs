//! DNS verification against a real nameserver (dnsmasq, from the e2e harness): records that
//! are right, missing, mismatched, and a nameserver that does not answer.
//!
//! dnsmasq runs on 127.0.0.1 inside the private network namespace of `scripts/netns.sh`
//! (`scripts/test.sh` runs every test there); outside it they fail with that instruction, as
//! every e2e scenario does, rather than pass without testing. The resolver is only ever given
//! explicit nameservers.

use std::{net::SocketAddr, time::Duration};

use herald_core::resources::{DkimAlgorithm, DmarcPolicy, RecordPurpose, RecordState};
use herald_core::resources::{DnsRecordStatus, KeyRole, SelectorStatus};
use herald_e2e::{Dns, DnsRecords, Scenario};
use herald_operator::{
    cli::{DnsArgs, DomainCommand},
    dkim::{self, PublicKey},
    dns::HickoryLookup,
    records::{self, DnsPolicy, Expectations, ReturnPathTarget},
};

const DOMAIN: &str = "example.test";
const EGRESS: &str = "192.0.2.10";
const TOKEN: &str = "0123456789abcdef0123456789abcdef";

/// The scenario; panics with instructions outside the private network namespace.
fn scenario(name: &str) -> Option<Scenario> {
    Some(Scenario::new(name))
}

struct Key {
    pem: String,
    public: PublicKey,
}

fn key(alg: DkimAlgorithm) -> Key {
    let pem = dkim::generate(alg).expect("generate");
    let public = PublicKey::from_private_pem(alg, &pem).expect("public");
    Key { pem, public }
}

fn selector(sel: &str, alg: DkimAlgorithm, key: &Key) -> (SelectorStatus, PublicKey) {
    let value = key.public.txt_value();
    (
        SelectorStatus {
            selector: sel.into(),
            role: KeyRole::Active,
            algorithm: alg,
            name: format!("{sel}._domainkey.{DOMAIN}"),
            strings: dkim::split_strings(&value),
            value,
        },
        key.public.clone(),
    )
}

fn lookup(dns: &Dns) -> HickoryLookup {
    let addr: SocketAddr = dns.addr().parse().expect("addr");
    HickoryLookup::new(&[addr], Duration::from_secs(2)).expect("resolver")
}

fn policy() -> DnsPolicy {
    DnsPolicy {
        egress_ips: vec![EGRESS.parse().expect("ip")],
        spf_include: None,
        return_path: Some(ReturnPathTarget::Cname("bounce.herald.test".into())),
        egress_names: Vec::new(),
    }
}

fn expectations(rsa: &Key, ed: &Key, dmarc: DmarcPolicy) -> Expectations {
    Expectations {
        domain: DOMAIN.into(),
        dkim: vec![
            selector("s1", DkimAlgorithm::RsaSha256, rsa),
            selector("s1-ed25519", DkimAlgorithm::Ed25519Sha256, ed),
        ],
        ownership_token: Some(TOKEN.into()),
        return_path: Some(format!("bounces.{DOMAIN}")),
        dmarc,
        mx: vec!["mx.example.test".into()],
    }
}

fn by_purpose(rows: &[DnsRecordStatus]) -> Vec<(RecordPurpose, RecordState)> {
    rows.iter().map(|r| (r.purpose, r.state)).collect()
}

#[tokio::test]
async fn records_published_right_are_verified() {
    let Some(sc) = scenario("dns-right") else {
        return;
    };
    let (rsa, ed) = (
        key(DkimAlgorithm::RsaSha256),
        key(DkimAlgorithm::Ed25519Sha256),
    );
    let records = DnsRecords::new()
        .txt(
            &format!("_herald-challenge.{DOMAIN}"),
            &format!("herald-verification={TOKEN}"),
        )
        // The RSA record is longer than 255 octets: dnsmasq serves it as several strings.
        .txt(&format!("s1._domainkey.{DOMAIN}"), &rsa.public.txt_value())
        .txt(
            &format!("s1-ed25519._domainkey.{DOMAIN}"),
            &ed.public.txt_value(),
        )
        .txt(DOMAIN, "v=spf1 mx ip4:192.0.2.0/24 -all")
        .txt(DOMAIN, "google-site-verification=unrelated")
        .txt(
            &format!("_dmarc.{DOMAIN}"),
            "v=DMARC1; p=reject; rua=mailto:d@example.test",
        )
        .raw(&format!("cname=bounces.{DOMAIN},bounce.herald.test"))
        .a("bounce.herald.test", "127.0.0.9".parse().expect("ip"))
        .mx(DOMAIN, "mx.example.test", 10)
        .a("mx.example.test", "127.0.0.8".parse().expect("ip"));
    let dns = Dns::start(&sc, &records);
    let rows = records::verify(
        &lookup(&dns),
        &policy(),
        &expectations(&rsa, &ed, DmarcPolicy::Quarantine),
    )
    .await;
    assert_eq!(
        by_purpose(&rows),
        [
            (RecordPurpose::Ownership, RecordState::Verified),
            (RecordPurpose::Dkim, RecordState::Verified),
            (RecordPurpose::Dkim, RecordState::Verified),
            (RecordPurpose::Spf, RecordState::Verified),
            (RecordPurpose::Dmarc, RecordState::Verified),
            (RecordPurpose::ReturnPath, RecordState::Verified),
            (RecordPurpose::Mx, RecordState::Verified),
        ],
        "{rows:#?}\n{}",
        dns.log()
    );
    // The split record comes back joined, exactly the value we asked to publish.
    assert_eq!(rows[1].observed, vec![rsa.public.txt_value()]);
    // Only SPF records are shown as observed, not the other TXT records at the apex.
    assert_eq!(rows[3].observed, vec!["v=spf1 mx ip4:192.0.2.0/24 -all"]);
}

#[tokio::test]
async fn unpublished_records_are_missing() {
    let Some(sc) = scenario("dns-missing") else {
        return;
    };
    let (rsa, ed) = (
        key(DkimAlgorithm::RsaSha256),
        key(DkimAlgorithm::Ed25519Sha256),
    );
    // Only an unrelated TXT at the apex: SPF is missing although the name exists.
    let dns = Dns::start(&sc, &DnsRecords::new().txt(DOMAIN, "hello"));
    let rows = records::verify(
        &lookup(&dns),
        &policy(),
        &expectations(&rsa, &ed, DmarcPolicy::Quarantine),
    )
    .await;
    assert!(
        rows.iter().all(|r| r.state == RecordState::Missing),
        "{rows:#?}"
    );
    let spf = rows
        .iter()
        .find(|r| r.purpose == RecordPurpose::Spf)
        .expect("spf");
    assert_eq!(spf.message, "no v=spf1 record at example.test");
    assert_eq!(spf.expected, format!("v=spf1 ip4:{EGRESS} ~all"));
    let dkim = rows
        .iter()
        .find(|r| r.purpose == RecordPurpose::Dkim)
        .expect("dkim");
    assert!(
        dkim.message
            .starts_with("no TXT record at s1._domainkey.example.test"),
        "{}",
        dkim.message
    );
}

#[tokio::test]
async fn wrong_records_are_mismatched_with_what_differs() {
    let Some(sc) = scenario("dns-mismatch") else {
        return;
    };
    let (rsa, ed) = (
        key(DkimAlgorithm::RsaSha256),
        key(DkimAlgorithm::Ed25519Sha256),
    );
    let other = key(DkimAlgorithm::RsaSha256);
    let records = DnsRecords::new()
        .txt(
            &format!("_herald-challenge.{DOMAIN}"),
            "herald-verification=someone-else",
        )
        .txt(
            &format!("s1._domainkey.{DOMAIN}"),
            &other.public.txt_value(),
        )
        // An RSA record where the Ed25519 key should be.
        .txt(
            &format!("s1-ed25519._domainkey.{DOMAIN}"),
            &other.public.txt_value(),
        )
        .txt(DOMAIN, "v=spf1 ip4:198.51.100.0/24 -all")
        .txt(&format!("_dmarc.{DOMAIN}"), "v=DMARC1; p=none")
        .raw(&format!("cname=bounces.{DOMAIN},elsewhere.test"))
        .a("elsewhere.test", "127.0.0.9".parse().expect("ip"))
        .mx(DOMAIN, "other-mx.example.test", 10)
        .a("other-mx.example.test", "127.0.0.8".parse().expect("ip"));
    let dns = Dns::start(&sc, &records);
    let rows = records::verify(
        &lookup(&dns),
        &policy(),
        &expectations(&rsa, &ed, DmarcPolicy::Quarantine),
    )
    .await;
    assert!(
        rows.iter().all(|r| r.state == RecordState::Mismatch),
        "{rows:#?}\n{}",
        dns.log()
    );
    let messages: Vec<&str> = rows.iter().map(|r| r.message.as_str()).collect();
    assert_eq!(
        messages,
        [
            "herald-verification value differs from this MailDomain's token",
            "published public key differs from the key in the DKIM Secret",
            "k=rsa published, the key in the Secret is ed25519",
            "does not authorise 192.0.2.10",
            "p=none is weaker than the quarantine asked for",
            "CNAME does not point at bounce.herald.test: bounces would not reach Herald",
            "MX host(s) missing: mx.example.test",
        ]
    );
    assert_eq!(rows[4].observed, vec!["v=DMARC1; p=none"]);
}

#[tokio::test]
async fn unreachable_nameserver_is_an_error_with_the_resolvers_message() {
    let Some(sc) = scenario("dns-unreachable") else {
        return;
    };
    // A port nobody listens on, inside the namespace: queries are refused or time out.
    let addr: SocketAddr = format!("127.0.0.1:{}", sc.port()).parse().expect("addr");
    let lookup = HickoryLookup::new(&[addr], Duration::from_millis(300)).expect("resolver");
    let (rsa, ed) = (
        key(DkimAlgorithm::RsaSha256),
        key(DkimAlgorithm::Ed25519Sha256),
    );
    let rows = records::verify(
        &lookup,
        &policy(),
        &expectations(&rsa, &ed, DmarcPolicy::None),
    )
    .await;
    for r in &rows {
        assert_eq!(r.state, RecordState::Error, "{r:#?}");
        assert!(
            r.message.starts_with("DNS lookup failed: "),
            "{}",
            r.message
        );
        assert!(r.message.len() > "DNS lookup failed: ".len());
    }
}

fn domain_file(sc: &Scenario, rsa_pem: &str) -> std::path::PathBuf {
    let indented: String = rsa_pem.lines().map(|l| format!("    {l}\n")).collect();
    let yaml = format!(
        "apiVersion: herald.dev/v1alpha1\nkind: MailDomain\nmetadata: {{name: example-test}}\n\
         spec:\n  domain: {DOMAIN}\n  dkim: {{selector: s1}}\n  dmarc: {{policy: reject}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: example-test-dkim}}\nstringData:\n  rsa-sha256.pem: |\n{indented}"
    );
    let path = sc.dir().join("domain.yaml");
    std::fs::write(&path, yaml).expect("write domain.yaml");
    path
}

fn check(file: std::path::PathBuf, dns: &Dns) -> DomainCommand {
    DomainCommand::Check {
        file,
        name: None,
        dns: DnsArgs {
            nameservers: vec![dns.addr().parse().expect("addr")],
            dns_timeout: Duration::from_secs(2),
            egress_ips: vec![EGRESS.parse().expect("egress ip")],
            spf_include: None,
            return_path_cname: None,
            return_path_mx: None,
        },
    }
}

#[tokio::test]
async fn domain_check_is_ready_only_when_every_record_is_published() {
    let Some(sc) = scenario("domain-check") else {
        return;
    };
    let rsa = key(DkimAlgorithm::RsaSha256);
    let file = domain_file(&sc, &rsa.pem);
    let partial = DnsRecords::new()
        .txt(&format!("s1._domainkey.{DOMAIN}"), &rsa.public.txt_value())
        .txt(DOMAIN, &format!("v=spf1 ip4:{EGRESS} -all"));
    {
        let dns = Dns::start(&sc, &partial);
        let ready = herald_operator::cli::domain(check(file.clone(), &dns))
            .await
            .expect("check runs");
        assert!(!ready, "DMARC is missing: not ready");
    }
    let full = partial.txt(&format!("_dmarc.{DOMAIN}"), "v=DMARC1; p=reject");
    let dns = Dns::start(&sc, &full);
    let ready = herald_operator::cli::domain(check(file, &dns))
        .await
        .expect("check runs");
    assert!(ready, "{}", dns.log());
}

#[tokio::test]
async fn egress_ptr_is_forward_confirmed_or_says_what_is_wrong() {
    let Some(sc) = scenario("dns-ptr") else {
        return;
    };
    let records = DnsRecords::new()
        // Unknown reverse names in this range get NXDOMAIN, not REFUSED.
        .raw("local=/2.0.192.in-addr.arpa/")
        // .10: PTR and A agree (host-record makes both).
        .a("mta1.example.test", "192.0.2.10".parse().expect("ip"))
        // .11: PTR says mta2, but mta2 resolves elsewhere.
        .raw("ptr-record=11.2.0.192.in-addr.arpa,mta2.example.test")
        .raw("address=/mta2.example.test/192.0.2.99")
        // .12: PTR names another host than the EHLO name.
        .a("other.example.test", "192.0.2.12".parse().expect("ip"));
    let dns = Dns::start(&sc, &records);
    let names = [
        ("192.0.2.10", "mta1.example.test"),
        ("192.0.2.11", "mta2.example.test"),
        ("192.0.2.12", "mta3.example.test"),
        ("192.0.2.13", "mta4.example.test"),
    ];
    let policy = DnsPolicy {
        egress_names: names
            .iter()
            .map(|(ip, n)| (ip.parse().expect("ip"), n.to_string()))
            .collect(),
        ..DnsPolicy::default()
    };
    let exp = Expectations {
        domain: DOMAIN.into(),
        dkim: Vec::new(),
        ownership_token: None,
        return_path: None,
        dmarc: DmarcPolicy::None,
        mx: Vec::new(),
    };
    let rows = records::verify(&lookup(&dns), &policy, &exp).await;
    let ptr: Vec<(&str, RecordState, &str)> = rows
        .iter()
        .filter(|r| r.purpose == RecordPurpose::Ptr)
        .map(|r| (r.name.as_str(), r.state, r.message.as_str()))
        .collect();
    assert_eq!(
        ptr,
        [
            (
                "10.2.0.192.in-addr.arpa",
                RecordState::Verified,
                "192.0.2.10 <-> mta1.example.test (forward-confirmed)"
            ),
            (
                "11.2.0.192.in-addr.arpa",
                RecordState::Mismatch,
                "mta2.example.test resolves to 192.0.2.99, not 192.0.2.11"
            ),
            (
                "12.2.0.192.in-addr.arpa",
                RecordState::Mismatch,
                "192.0.2.12 does not point back at its EHLO name mta3.example.test"
            ),
            (
                "13.2.0.192.in-addr.arpa",
                RecordState::Missing,
                "no PTR record at 13.2.0.192.in-addr.arpa: publish the expected value"
            ),
        ],
        "{}",
        dns.log()
    );
}
