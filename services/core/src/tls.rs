//! rustls configurations: the server side of STARTTLS / implicit TLS, and the client side
//! used for opportunistic STARTTLS towards MX hosts.

use std::sync::Arc;

use rustls::{
    ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject};

use crate::{Error, config::TlsFiles};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Server configuration from PEM files.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, Error> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| Error::Tls(format!("{}: {e}", files.cert.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| Error::Tls(format!("{}: {e}", files.cert.display())))?;
    if certs.is_empty() {
        return Err(Error::Tls(format!(
            "{}: no certificate found",
            files.cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| Error::Tls(format!("{}: {e}", files.key.display())))?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| Error::Tls(e.to_string()))?;
    Ok(Arc::new(config))
}

/// Client configuration for opportunistic STARTTLS between MTAs: encrypt, but accept any
/// certificate (RFC 7435). Certificate checks belong to MTA-STS / DANE policies, which
/// pin the peer explicitly; without one, refusing a self-signed MX would only push the
/// message to plaintext.
pub fn opportunistic_client_config() -> Arc<ClientConfig> {
    let provider = provider();
    let config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map(|b| {
            b.dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth()
        });
    match config {
        Ok(c) => Arc::new(c),
        // The aws-lc provider always supports the safe defaults; this arm is unreachable in
        // practice but keeps the function infallible without a panic.
        Err(_) => Arc::new(
            ClientConfig::builder()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(
                    rustls::crypto::CryptoProvider::get_default()
                        .cloned()
                        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider())),
                )))
                .with_no_client_auth(),
        ),
    }
}

/// Client configuration that verifies the server: the certificate must chain to the
/// system's trusted roots and match the name dialled (smarthosts).
pub fn verified_client_config() -> Result<Arc<ClientConfig>, Error> {
    let loaded = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(loaded.certs);
    if added == 0 {
        return Err(Error::Tls(format!(
            "no trusted root certificates found on this system ({} errors)",
            loaded.errors.len()
        )));
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    // Handshake signatures are still checked: the peer must own the key it presented.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
