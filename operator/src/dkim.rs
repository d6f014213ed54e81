//! DKIM keys: generation (aws-lc-rs, the crypto the data plane signs with), the public half
//! of a stored private key, and the TXT record that publishes it.

use aws_lc_rs::{
    encoding::AsDer,
    rand::SystemRandom,
    rsa,
    signature::{Ed25519KeyPair, KeyPair as _},
};
use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use herald_core::resources::DkimAlgorithm;
use rustls_pki_types::{PrivateKeyDer, pem::PemObject};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("generating a {0} key failed")]
    Generate(&'static str),
    #[error("the {algorithm} key is not a usable private key: {reason}")]
    Invalid {
        algorithm: &'static str,
        reason: String,
    },
}

/// A new private key for `algorithm` (`rsa-sha256`: RSA 2048; `ed25519-sha256`), as PKCS#8
/// PEM: the form the data plane reads from the DKIM Secret.
pub fn generate(algorithm: DkimAlgorithm) -> Result<String, KeyError> {
    let der = match algorithm {
        DkimAlgorithm::Ed25519Sha256 => Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| KeyError::Generate("ed25519"))?
            .as_ref()
            .to_vec(),
        // `Both` is two keys; callers ask for each algorithm separately, and the RSA key is
        // what `Both` stores under its first selector.
        DkimAlgorithm::RsaSha256 | DkimAlgorithm::Both => {
            let pair = rsa::KeyPair::generate(rsa::KeySize::Rsa2048)
                .map_err(|_| KeyError::Generate("rsa-2048"))?;
            pair.as_der()
                .map_err(|_| KeyError::Generate("rsa-2048"))?
                .as_ref()
                .to_vec()
        }
    };
    Ok(pem("PRIVATE KEY", &der))
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = B64.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        // Base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The public half of a DKIM key, in the forms a `p=` tag may carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    /// `rsa` or `ed25519` (the `k=` tag).
    pub key_type: &'static str,
    /// What we publish: SubjectPublicKeyInfo DER for RSA (RFC 6376 3.6.1), the raw 32 bytes
    /// for Ed25519 (RFC 8463 4.2).
    pub published: Vec<u8>,
    /// Another encoding of the same key verifiers also accept (RSA: the bare PKCS#1
    /// `RSAPublicKey`), so a record published that way still counts as an exact match.
    pub alternative: Option<Vec<u8>>,
}

impl PublicKey {
    /// Reads the public key out of a private key PEM (PKCS#8, or PKCS#1 for RSA).
    pub fn from_private_pem(algorithm: DkimAlgorithm, pem: &str) -> Result<PublicKey, KeyError> {
        let invalid = |reason: String| KeyError::Invalid {
            algorithm: algorithm.as_str(),
            reason,
        };
        let der =
            PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| invalid(e.to_string()))?;
        match algorithm {
            DkimAlgorithm::Ed25519Sha256 => {
                let PrivateKeyDer::Pkcs8(p) = der else {
                    return Err(invalid("Ed25519 keys must be PKCS#8".into()));
                };
                let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(p.secret_pkcs8_der())
                    .map_err(|e| invalid(e.to_string()))?;
                Ok(PublicKey {
                    key_type: "ed25519",
                    published: pair.public_key().as_ref().to_vec(),
                    alternative: None,
                })
            }
            DkimAlgorithm::RsaSha256 | DkimAlgorithm::Both => {
                let pair = match &der {
                    PrivateKeyDer::Pkcs8(p) => rsa::KeyPair::from_pkcs8(p.secret_pkcs8_der()),
                    PrivateKeyDer::Pkcs1(p) => rsa::KeyPair::from_der(p.secret_pkcs1_der()),
                    _ => return Err(invalid("not an RSA key".into())),
                }
                .map_err(|e| invalid(e.to_string()))?;
                let public = pair.public_key();
                let spki = public
                    .as_der()
                    .map_err(|_| invalid("cannot encode the public key".into()))?;
                Ok(PublicKey {
                    key_type: "rsa",
                    published: spki.as_ref().to_vec(),
                    alternative: Some(public.as_ref().to_vec()),
                })
            }
        }
    }

    /// The TXT record value to publish at `<selector>._domainkey.<domain>`.
    pub fn txt_value(&self) -> String {
        format!(
            "v=DKIM1; k={}; p={}",
            self.key_type,
            B64.encode(&self.published)
        )
    }

    /// True when `der` (a decoded `p=`) is this key.
    pub fn matches(&self, der: &[u8]) -> bool {
        der == self.published.as_slice() || self.alternative.as_deref() == Some(der)
    }
}

/// Splits a TXT value into character-strings of at most 255 octets (RFC 1035 3.3.14), the
/// form long RSA key records must be published in.
pub fn split_strings(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = value;
    while rest.len() > 255 {
        let mut cut = 255;
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        out.push(rest[..cut].to_string());
        rest = &rest[cut..];
    }
    out.push(rest.to_string());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_load_in_the_data_planes_signer() {
        use mail_auth::crypto::{Ed25519Key, RsaKey, Sha256};
        let rsa_pem = generate(DkimAlgorithm::RsaSha256).expect("rsa");
        assert!(rsa_pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let der = PrivateKeyDer::from_pem_slice(rsa_pem.as_bytes()).expect("pem");
        let rsa = RsaKey::<Sha256>::from_key_der(der).expect("mail-auth loads the RSA key");
        let public = PublicKey::from_private_pem(DkimAlgorithm::RsaSha256, &rsa_pem).expect("pub");
        assert!(public.matches(&rsa.public_key()), "PKCS#1 form matches too");
        // 2048-bit modulus: SPKI DER of RSA-2048 is 294 octets.
        assert_eq!(public.published.len(), 294);

        let ed_pem = generate(DkimAlgorithm::Ed25519Sha256).expect("ed25519");
        let PrivateKeyDer::Pkcs8(p) =
            PrivateKeyDer::from_pem_slice(ed_pem.as_bytes()).expect("pem")
        else {
            panic!("PKCS#8 expected");
        };
        let ed = Ed25519Key::from_pkcs8_der(p.secret_pkcs8_der()).expect("mail-auth loads it");
        let public =
            PublicKey::from_private_pem(DkimAlgorithm::Ed25519Sha256, &ed_pem).expect("pub");
        assert_eq!(public.published, ed.public_key());
        assert!(public.txt_value().starts_with("v=DKIM1; k=ed25519; p="));
    }

    #[test]
    fn long_rsa_record_is_split_into_255_octet_strings() {
        let pem = generate(DkimAlgorithm::RsaSha256).expect("rsa");
        let value = PublicKey::from_private_pem(DkimAlgorithm::RsaSha256, &pem)
            .expect("pub")
            .txt_value();
        let strings = split_strings(&value);
        assert_eq!(strings.len(), 2);
        assert_eq!(strings[0].len(), 255);
        assert_eq!(strings.concat(), value);
    }

    #[test]
    fn garbage_private_key_is_refused_with_reason() {
        let err = PublicKey::from_private_pem(DkimAlgorithm::RsaSha256, "not a key")
            .expect_err("invalid");
        assert!(err.to_string().contains("rsa-sha256"), "{err}");
    }
}
