//! Keys and certificates made with the openssl CLI; DKIM checked by dkimpy.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

use crate::process::{run, run_ok_bytes};
use crate::{Dns, Scenario, find_tool, venv_dir, workspace_root};

/// A DKIM private key (PKCS#8 PEM, what goes into the MailDomain's Secret) and the TXT
/// record publishing its public half (what goes at `<selector>._domainkey.<domain>`).
#[derive(Clone, Debug)]
pub struct DkimKey {
    pub private_pem: String,
    pub dns_txt: String,
}

impl DkimKey {
    /// RSA of `bits` bits; TXT `v=DKIM1; k=rsa; p=<base64 DER SubjectPublicKeyInfo>`.
    pub fn rsa(bits: u32) -> DkimKey {
        let pem = openssl_bytes(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            &format!("rsa_keygen_bits:{bits}"),
        ]);
        let spki = public_der(&pem);
        DkimKey {
            private_pem: pem_string(pem),
            dns_txt: format!("v=DKIM1; k=rsa; p={}", B64.encode(spki)),
        }
    }

    /// Ed25519; TXT `v=DKIM1; k=ed25519; p=<base64 of the raw 32-byte public key>`
    /// (RFC 8463: not the SubjectPublicKeyInfo, only the key, its last 32 bytes).
    pub fn ed25519() -> DkimKey {
        let pem = openssl_bytes(&["genpkey", "-algorithm", "ed25519"]);
        let spki = public_der(&pem);
        assert_eq!(spki.len(), 44, "Ed25519 SubjectPublicKeyInfo is 44 bytes");
        DkimKey {
            private_pem: pem_string(pem),
            dns_txt: format!("v=DKIM1; k=ed25519; p={}", B64.encode(&spki[12..])),
        }
    }

    pub fn is_ed25519(&self) -> bool {
        self.dns_txt.contains("k=ed25519")
    }

    /// The DER bytes inside the PEM (PKCS#8 PrivateKeyInfo).
    pub fn private_der(&self) -> Vec<u8> {
        let body: String = self
            .private_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        B64.decode(body.trim())
            .expect("openssl wrote valid base64 PEM")
    }

    /// The key in the form dkimpy's `dkimsign` reads: the PEM for RSA, the base64 of the
    /// raw 32-byte seed for Ed25519 (the last 32 bytes of its PKCS#8 DER).
    pub fn dkimpy_private_key(&self) -> String {
        if self.is_ed25519() {
            let der = self.private_der();
            assert_eq!(der.len(), 48, "Ed25519 PKCS#8 PrivateKeyInfo is 48 bytes");
            B64.encode(&der[16..])
        } else {
            self.private_pem.clone()
        }
    }
}

fn openssl_bytes(args: &[&str]) -> Vec<u8> {
    run_ok_bytes(Command::new(find_tool("openssl", &[])).args(args), None)
}

fn public_der(private_pem: &[u8]) -> Vec<u8> {
    run_ok_bytes(
        Command::new(find_tool("openssl", &[])).args(["pkey", "-pubout", "-outform", "DER"]),
        Some(private_pem),
    )
}

fn pem_string(pem: Vec<u8>) -> String {
    String::from_utf8(pem).expect("PEM is ASCII")
}

/// A self-signed certificate for `herald.test` (RSA 2048): `<dir>/cert.pem`, `<dir>/key.pem`
/// (PKCS#8). Returns (cert path, key path).
pub fn self_signed_cert(dir: &Path) -> (PathBuf, PathBuf) {
    self_signed_cert_named(dir, "herald.test")
}

pub(crate) fn self_signed_cert_named(dir: &Path, host: &str) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    run_ok_bytes(
        Command::new(find_tool("openssl", &[]))
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
            ])
            .arg("-subj")
            .arg(format!("/CN={host}"))
            .arg("-addext")
            .arg(format!("subjectAltName=DNS:{host}"))
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert),
        None,
    );
    (cert, key)
}

fn python() -> PathBuf {
    let p = venv_dir().join("bin/python");
    assert!(
        p.is_file(),
        "{} missing: run scripts/install-deps.sh --test",
        p.display()
    );
    p
}

/// Verifies every DKIM-Signature of `message` with dkimpy, fetching keys from `dns` only
/// (`e2e/tools/dkim_verify.py`). Returns (all signatures verify and there is at least one,
/// the script's report: one line per signature, `sig N d=.. s=.. a=.. ok|FAIL reason`).
pub fn dkim_verify(message: &[u8], dns: &Dns) -> (bool, String) {
    let script = workspace_root().join("e2e/tools/dkim_verify.py");
    let out = run(
        Command::new(python())
            .arg(&script)
            .arg("--dns")
            .arg(dns.addr()),
        Some(message),
        Duration::from_secs(60),
    );
    (out.code == Some(0), format!("{}{}", out.stdout, out.stderr))
}

/// Signs `message` with dkimpy's `dkimsign` (relaxed/simple, like its defaults), returning
/// the message with the DKIM-Signature prepended. For harness self-tests: it proves the
/// key/TXT formats of [`DkimKey`] independently of Herald.
pub fn dkimpy_sign(
    scenario: &Scenario,
    message: &[u8],
    domain: &str,
    selector: &str,
    key: &DkimKey,
) -> Vec<u8> {
    let key_file = scenario
        .dir()
        .join(format!("dkimpy-{selector}.{domain}.key"));
    std::fs::write(&key_file, key.dkimpy_private_key())
        .unwrap_or_else(|e| panic!("write {}: {e}", key_file.display()));
    let signalg = if key.is_ed25519() {
        "ed25519-sha256"
    } else {
        "rsa-sha256"
    };
    let out = run(
        Command::new(python())
            .arg(venv_dir().join("bin/dkimsign"))
            .args(["--signalg", signalg, selector, domain])
            .arg(&key_file),
        Some(message),
        Duration::from_secs(60),
    );
    assert_eq!(out.code, Some(0), "dkimsign failed: {}", out.stderr);
    out.stdout.into_bytes()
}
