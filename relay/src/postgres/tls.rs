//! TLS for PostgreSQL connections: a rustls client configuration per libpq
//! `sslmode`, with the CA certificates from `sslrootcert`, `~/.postgresql/root.crt`
//! or the system store (`sslrootcert=system`, or verify-full without a CA
//! file; never verify-ca, which with public CAs would authenticate nobody).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::postgres::config::{SYSTEM_ROOTS, SslMode};
use crate::{Error, Result};

/// The mode libpq actually applies: for backward compatibility `require`
/// verifies the chain like `verify-ca` when a CA file is given
/// (`sslrootcert`, `PGSSLROOTCERT`) or `~/.postgresql/root.crt` exists.
pub fn effective_mode(mode: SslMode, rootcert: Option<&Path>) -> SslMode {
    if mode != SslMode::Require {
        return mode;
    }
    let has_file = match rootcert {
        Some(p) => p.as_os_str() != SYSTEM_ROOTS,
        None => default_root_file().is_some(),
    };
    if has_file { SslMode::VerifyCa } else { mode }
}

fn default_root_file() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".postgresql/root.crt"))
        .filter(|p| p.exists())
}

/// Builds the client configuration for `mode` (as [`effective_mode`] gives
/// it); `None` for `disable`.
pub fn client_config(mode: SslMode, rootcert: Option<&Path>) -> Result<Option<Arc<ClientConfig>>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(format!("cannot set up TLS: {e}")))?;
    let verifier: Arc<dyn ServerCertVerifier> = match mode {
        SslMode::Disable => return Ok(None),
        // libpq semantics: prefer, and require without a CA file, encrypt
        // but do not authenticate the server.
        SslMode::Prefer | SslMode::Require => Arc::new(Unverified {
            algorithms: provider.signature_verification_algorithms,
        }),
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let roots = Arc::new(load_roots(mode, rootcert)?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| Error::Tls(format!("cannot use the CA certificates: {e}")))?;
            if mode == SslMode::VerifyCa {
                Arc::new(ChainOnly { inner: webpki })
            } else {
                webpki
            }
        }
    };
    let config = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Some(Arc::new(config)))
}

fn load_roots(mode: SslMode, rootcert: Option<&Path>) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    let file = match rootcert {
        Some(p) if p.as_os_str() == SYSTEM_ROOTS => None,
        Some(p) => Some(p.to_path_buf()),
        None => default_root_file(),
    };
    if file.is_none() && mode == SslMode::VerifyCa {
        // verify-ca skips the host name: against the system's trust store,
        // any certificate a public CA issued to anyone would pass.
        return Err(Error::Tls(
            "sslmode=verify-ca needs the CA that signed the server's certificate: set \
             sslrootcert=/path/ca.pem in the database URL (or PGSSLROOTCERT); with the system's \
             trust store only verify-full authenticates the server"
                .into(),
        ));
    }
    match file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(&path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    Error::Tls(format!(
                        "cannot read CA certificates from sslrootcert `{}`: {e}",
                        path.display()
                    ))
                })?;
            if certs.is_empty() {
                return Err(Error::Tls(format!(
                    "sslrootcert `{}` holds no PEM certificate",
                    path.display()
                )));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| {
                    Error::Tls(format!("bad CA certificate in `{}`: {e}", path.display()))
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(Error::Tls(
                    "sslmode verify-ca/verify-full needs CA certificates: set sslrootcert=/path/ca.pem in the \
                     database URL"
                        .into(),
                ));
            }
        }
    }
    Ok(roots)
}

/// Accepts any certificate but still checks the handshake signatures, as
/// libpq's `require` does.
#[derive(Debug)]
struct Unverified {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Unverified {
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

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// verify-ca: the chain must lead to a trusted CA; the host name may differ.
#[derive(Debug)]
struct ChainOnly {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn require_with_a_ca_file_verifies_the_chain_as_libpq_does() {
        let file = Path::new("/etc/outbox/ca.pem");
        assert_eq!(
            effective_mode(SslMode::Require, Some(file)),
            SslMode::VerifyCa
        );
        assert_eq!(
            effective_mode(SslMode::Require, Some(Path::new(SYSTEM_ROOTS))),
            SslMode::Require
        );
        assert_eq!(effective_mode(SslMode::Prefer, Some(file)), SslMode::Prefer);
        assert_eq!(
            effective_mode(SslMode::VerifyFull, None),
            SslMode::VerifyFull
        );
    }

    #[test]
    fn verify_ca_refuses_the_system_store() {
        for rootcert in [Some(Path::new(SYSTEM_ROOTS)), None] {
            // HOME without ~/.postgresql/root.crt: no CA file at all.
            if rootcert.is_none()
                && std::env::var_os("HOME")
                    .is_some_and(|h| PathBuf::from(h).join(".postgresql/root.crt").exists())
            {
                continue;
            }
            let Err(err) = client_config(SslMode::VerifyCa, rootcert) else {
                panic!("verify-ca without a CA file is refused");
            };
            let err = err.to_string();
            assert!(err.contains("sslrootcert=/path/ca.pem"), "{err}");
        }
    }
}
