//! TLS for PostgreSQL connections: a rustls client configuration per libpq
//! `sslmode`, with the CA certificates from `sslrootcert`, `~/.postgresql/root.crt`
//! or the system store (`sslrootcert=system`, or verify-full without a CA
//! file; never verify-ca, which with public CAs would authenticate nobody),
//! and the `tls-server-end-point` channel binding of SCRAM-SHA-256-PLUS.

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

/// libpq's default CA file, `~/.postgresql/root.crt`, when it exists.
pub fn default_root_file() -> Option<PathBuf> {
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

/// The `tls-server-end-point` channel binding data (RFC 5929) of a server
/// certificate (DER): its hash under the hash function of its signature
/// algorithm, SHA-256 for MD5 and SHA-1 signatures. `None` when the
/// algorithm has no such hash (Ed25519, Ed448) or the certificate cannot be
/// read: PostgreSQL cannot bind such a certificate either.
pub fn server_end_point(cert: &[u8]) -> Option<Vec<u8>> {
    use sha2::Digest as _;
    let hash = signature_hash(cert)?;
    Some(match hash {
        Hash::Sha224 => sha2::Sha224::digest(cert).to_vec(),
        Hash::Sha256 => sha2::Sha256::digest(cert).to_vec(),
        Hash::Sha384 => sha2::Sha384::digest(cert).to_vec(),
        Hash::Sha512 => sha2::Sha512::digest(cert).to_vec(),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hash {
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

/// The hash of a certificate's `signatureAlgorithm`:
/// `Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm
/// AlgorithmIdentifier, signatureValue }`, `AlgorithmIdentifier ::=
/// SEQUENCE { algorithm OID, parameters }`.
fn signature_hash(cert: &[u8]) -> Option<Hash> {
    let (tag, certificate, _) = der(cert)?;
    if tag != 0x30 {
        return None;
    }
    let (_, _tbs, rest) = der(certificate)?;
    let (tag, algorithm, _) = der(rest)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, oid, parameters) = der(algorithm)?;
    if tag != 0x06 {
        return None;
    }
    // OIDs in DER (the bytes after tag and length).
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01];
    const ECDSA_SHA2: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03];
    const DSA_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x38, 0x04, 0x03];
    if let Some(last) = oid
        .strip_prefix(RSA)
        .and_then(|r| (r.len() == 1).then(|| r[0]))
    {
        return match last {
            // md5WithRSAEncryption, sha1WithRSAEncryption: SHA-256 (RFC 5929).
            4 | 5 | 11 => Some(Hash::Sha256),
            14 => Some(Hash::Sha224),
            12 => Some(Hash::Sha384),
            13 => Some(Hash::Sha512),
            // RSASSA-PSS: the hash is in the parameters.
            10 => pss_hash(parameters),
            _ => None,
        };
    }
    if oid == ECDSA_SHA1 || oid == DSA_SHA1 {
        return Some(Hash::Sha256);
    }
    // dsa-with-sha224 / dsa-with-sha256 (2.16.840.1.101.3.4.3.1/2).
    match oid.strip_prefix(&[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x03][..]) {
        Some([1]) => return Some(Hash::Sha224),
        Some([2]) => return Some(Hash::Sha256),
        _ => {}
    }
    if let Some(last) = oid
        .strip_prefix(ECDSA_SHA2)
        .and_then(|r| (r.len() == 1).then(|| r[0]))
    {
        return match last {
            1 => Some(Hash::Sha224),
            2 => Some(Hash::Sha256),
            3 => Some(Hash::Sha384),
            4 => Some(Hash::Sha512),
            _ => None,
        };
    }
    None
}

/// `RSASSA-PSS-params ::= SEQUENCE { hashAlgorithm [0] AlgorithmIdentifier
/// DEFAULT sha1, ... }`.
fn pss_hash(parameters: &[u8]) -> Option<Hash> {
    const SHA2: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02];
    let (tag, params, _) = der(parameters)?;
    if tag != 0x30 {
        return None;
    }
    let Some((0xa0, explicit, _)) = der(params) else {
        return Some(Hash::Sha256); // the default, SHA-1
    };
    let (_, algorithm, _) = der(explicit)?;
    let (tag, oid, _) = der(algorithm)?;
    if tag != 0x06 {
        return None;
    }
    match oid.strip_prefix(SHA2) {
        Some([1]) => Some(Hash::Sha256),
        Some([2]) => Some(Hash::Sha384),
        Some([3]) => Some(Hash::Sha512),
        Some([4]) => Some(Hash::Sha224),
        _ => None,
    }
}

/// One DER element: its tag, its contents and what follows it.
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
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

    /// A certificate as DER: SEQUENCE { tbs, SEQUENCE { OID, params }, BIT STRING }.
    fn certificate(oid: &[u8], params: &[u8]) -> Vec<u8> {
        let element = |tag: u8, content: &[u8]| {
            let mut out = vec![tag];
            if content.len() < 0x80 {
                out.push(content.len() as u8);
            } else {
                out.push(0x82);
                out.extend_from_slice(&(content.len() as u16).to_be_bytes());
            }
            out.extend_from_slice(content);
            out
        };
        // A long tbsCertificate, for the long length form.
        let tbs = element(0x30, &[0x55; 300]);
        let mut algorithm = element(0x06, oid);
        algorithm.extend_from_slice(params);
        let mut body = tbs;
        body.extend(element(0x30, &algorithm));
        body.extend(element(0x03, &[0, 1, 2, 3]));
        element(0x30, &body)
    }

    /// Issue 10, item 2: tls-server-end-point hashes the certificate with
    /// its signature's hash, SHA-256 for MD5/SHA-1 (RFC 5929), and gives
    /// nothing for a signature without one (Ed25519).
    #[test]
    fn the_end_point_hash_follows_the_signature_algorithm() {
        use sha2::Digest as _;
        let rsa = |n: u8| vec![0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, n];
        let ecdsa = |n: u8| vec![0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, n];
        let null = [0x05, 0x00];
        for (oid, params, want) in [
            (rsa(14), &null[..], 28),
            (ecdsa(1), &[][..], 28),
            (rsa(11), &null[..], 32),
            (rsa(5), &null[..], 32),
            (rsa(4), &null[..], 32),
            (rsa(12), &null[..], 48),
            (rsa(13), &null[..], 64),
            (ecdsa(2), &[][..], 32),
            (ecdsa(3), &[][..], 48),
            (ecdsa(4), &[][..], 64),
        ] {
            let cert = certificate(&oid, params);
            let hash = server_end_point(&cert).expect("a hash");
            assert_eq!(hash.len(), want, "{oid:x?}");
            let expected = match want {
                28 => sha2::Sha224::digest(&cert).to_vec(),
                32 => sha2::Sha256::digest(&cert).to_vec(),
                48 => sha2::Sha384::digest(&cert).to_vec(),
                _ => sha2::Sha512::digest(&cert).to_vec(),
            };
            assert_eq!(hash, expected);
        }
        // RSASSA-PSS with SHA-384 in its parameters, and with the default.
        let sha384 = [
            0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02, 0x05,
            0x00,
        ];
        let mut explicit = vec![0xa0, sha384.len() as u8];
        explicit.extend_from_slice(&sha384);
        let mut params = vec![0x30, explicit.len() as u8];
        params.extend_from_slice(&explicit);
        assert_eq!(
            server_end_point(&certificate(&rsa(10), &params))
                .unwrap()
                .len(),
            48
        );
        assert_eq!(
            server_end_point(&certificate(&rsa(10), &[0x30, 0x00]))
                .unwrap()
                .len(),
            32
        );
        // Ed25519: no hash; garbage: none.
        assert_eq!(
            server_end_point(&certificate(&[0x2b, 0x65, 0x70], &[])),
            None
        );
        assert_eq!(server_end_point(&[0x30, 0x84, 0xff]), None);
        assert_eq!(server_end_point(&[]), None);
    }
}
