//! DKIM signing with mail-auth: relaxed/relaxed, RFC 6376 5.4.1 recommended headers, From
//! over-signed so that a second From cannot be added without breaking the signature.

use herald_core::resources::{DkimAlgorithm, DkimKeyMaterial};
use mail_auth::{
    crypto::{DkimKey, Ed25519Key, RsaKey, Sha256},
    dkim::{Canonicalization, DkimSigner},
    headers::HeaderWriter,
    signer::Ready,
};
use rustls_pki_types::{PrivateKeyDer, pem::PemObject};
use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
    sync::{Arc, Mutex},
};

/// Headers signed on every message. Listing a header that is absent signs its absence;
/// `From` appears twice to over-sign it.
pub const SIGNED_HEADERS: &[&str] = &[
    "From",
    "From",
    "Reply-To",
    "Subject",
    "Date",
    "Message-ID",
    "To",
    "Cc",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "In-Reply-To",
    "References",
    "List-Id",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
];

#[derive(Debug, thiserror::Error)]
pub enum DkimError {
    #[error("DKIM key for selector {selector} cannot be read: {reason}")]
    Key { selector: String, reason: String },
    #[error("DKIM signing failed: {0}")]
    Sign(String),
}

/// A ready signer for one selector of one domain.
pub struct Signer {
    signer: DkimSigner<DkimKey, Ready>,
}

impl Signer {
    pub fn new(domain: &str, material: &DkimKeyMaterial) -> Result<Signer, DkimError> {
        let err = |reason: String| DkimError::Key {
            selector: material.selector.clone(),
            reason,
        };
        let der = PrivateKeyDer::from_pem_slice(material.private_key_pem.as_bytes())
            .map_err(|e| err(e.to_string()))?;
        let key = match material.algorithm {
            DkimAlgorithm::RsaSha256 | DkimAlgorithm::Both => {
                DkimKey::Rsa(RsaKey::<Sha256>::from_key_der(der).map_err(|e| err(e.to_string()))?)
            }
            DkimAlgorithm::Ed25519Sha256 => match der {
                PrivateKeyDer::Pkcs8(p) => DkimKey::Ed25519(
                    Ed25519Key::from_pkcs8_der(p.secret_pkcs8_der())
                        .map_err(|e| err(e.to_string()))?,
                ),
                _ => return Err(err("Ed25519 keys must be PKCS#8 PEM".into())),
            },
        };
        let signer = DkimSigner::from_key(key)
            .domain(domain.to_string())
            .selector(material.selector.clone())
            .headers(SIGNED_HEADERS.iter().copied())
            .header_canonicalization(Canonicalization::Relaxed)
            .body_canonicalization(Canonicalization::Relaxed);
        Ok(Signer { signer })
    }

    /// The `DKIM-Signature` header (with CRLF) for `message`.
    pub fn sign(&self, message: &[u8]) -> Result<String, DkimError> {
        let sig = self
            .signer
            .sign(message)
            .map_err(|e| DkimError::Sign(e.to_string()))?;
        Ok(sig.to_header())
    }
}

/// Signers by (domain, selector, key): reading the PEM and building the RSA key costs
/// more than a signature (the profile showed key set-up beside every RSA signing), so it
/// is done once per key. A rotated or changed key has another fingerprint and gets its
/// own entry; the map is emptied when it grows past what any installation rotates through.
#[derive(Default)]
pub struct SignerCache {
    signers: Mutex<HashMap<(String, String, u64), Arc<Signer>>>,
}

const CACHED_SIGNERS: usize = 1024;

impl SignerCache {
    pub fn get(&self, domain: &str, material: &DkimKeyMaterial) -> Result<Arc<Signer>, DkimError> {
        let fingerprint = {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            material.private_key_pem.hash(&mut h);
            material.algorithm.as_str().hash(&mut h);
            h.finish()
        };
        let key = (domain.to_string(), material.selector.clone(), fingerprint);
        if let Some(s) = self.signers.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(s);
        }
        let signer = Arc::new(Signer::new(domain, material)?);
        if let Ok(mut m) = self.signers.lock() {
            if m.len() >= CACHED_SIGNERS {
                m.clear();
            }
            m.insert(key, signer.clone());
        }
        Ok(signer)
    }
}

/// Signs with every signer; the headers come out in signer order, ready to prepend.
pub fn sign_all(signers: &[Arc<Signer>], message: &[u8]) -> Result<Vec<u8>, DkimError> {
    let mut headers = Vec::new();
    for s in signers {
        headers.extend_from_slice(s.sign(message)?.as_bytes());
    }
    Ok(headers)
}
