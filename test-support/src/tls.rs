//! TLS for tests: certificates made with the `openssl` command (a CA and a
//! server certificate for `localhost` and 127.0.0.1), and a TLS-terminating
//! proxy that puts a TLS listener in front of a plaintext server. Tansu 0.6
//! takes `--cert`/`--key` but never wraps its connections, so a broker with
//! TLS is this proxy in front of a Tansu that advertises the proxy's port.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Files made by [`certificates`].
pub struct Certificates {
    /// The CA's certificate (`ca.pem`): what a client trusts.
    pub ca: PathBuf,
    /// The server's certificate (`server.pem`), signed by the CA, for
    /// `localhost` and 127.0.0.1.
    pub cert: PathBuf,
    /// The server's private key (`server.key`).
    pub key: PathBuf,
}

/// A fresh CA and a server certificate it signed, in `dir` (created).
pub fn certificates(dir: &Path) -> Certificates {
    std::fs::create_dir_all(dir).expect("certificate dir");
    let days = ["-days", "2"];
    openssl(
        dir,
        &[
            &["req", "-x509", "-newkey", "rsa:2048", "-nodes"][..],
            &days,
            &["-subj", "/CN=outbox test CA"],
            &["-keyout", "ca.key", "-out", "ca.pem"],
        ]
        .concat(),
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .expect("write san.ext");
    openssl(
        dir,
        &[
            &["x509", "-req", "-in", "server.csr"][..],
            &["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial"],
            &days,
            &["-extfile", "san.ext", "-out", "server.pem"],
        ]
        .concat(),
    );
    Certificates {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
    }
}

/// A second server certificate in `dir`, signed by the CA that
/// [`certificates`] made there: an ECDSA P-384 key signed with SHA-384
/// (`server384.pem`, `server384.key`), for SCRAM channel binding, whose
/// hash follows the certificate's signature algorithm.
pub fn server_certificate_p384(dir: &Path) -> Certificates {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:secp384r1",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server384.key",
            "-out",
            "server384.csr",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-sha384",
            "-in",
            "server384.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server384.pem",
        ],
    );
    Certificates {
        ca: dir.join("ca.pem"),
        cert: dir.join("server384.pem"),
        key: dir.join("server384.key"),
    }
}

/// A TLS listener on `port` that forwards each connection's plaintext to
/// 127.0.0.1:`target`. Dropped: stops accepting and closes its connections.
pub struct TlsTerminator {
    /// Where clients connect with TLS.
    pub port: u16,
    handshakes: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl TlsTerminator {
    /// Listens on 127.0.0.1:`port` with the certificate chain and key of
    /// `certs`.
    pub async fn start(port: u16, target: u16, certs: &Certificates) -> Self {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&certs.cert)
            .expect("read server certificate")
            .collect::<Result<_, _>>()
            .expect("parse server certificate");
        let key = PrivateKeyDer::from_pem_file(&certs.key).expect("read server key");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("tls versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server certificate and key");
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind tls terminator");
        let handshakes = Arc::new(AtomicUsize::new(0));
        let accept = tokio::spawn({
            let handshakes = handshakes.clone();
            async move {
                let mut conns = tokio::task::JoinSet::new();
                while let Ok((inbound, _)) = listener.accept().await {
                    let acceptor = acceptor.clone();
                    let handshakes = handshakes.clone();
                    conns.spawn(async move {
                        // A client that does not trust us aborts the
                        // handshake: nothing to forward.
                        let Ok(mut tls) = acceptor.accept(inbound).await else {
                            return;
                        };
                        handshakes.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await {
                            let _ = copy_bidirectional(&mut tls, &mut outbound).await;
                        }
                    });
                }
            }
        });
        Self {
            port,
            handshakes,
            accept,
        }
    }

    /// How many TLS handshakes completed.
    pub fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::Relaxed)
    }
}

impl Drop for TlsTerminator {
    fn drop(&mut self) {
        // Aborting the accept task drops its JoinSet, which aborts every
        // forwarded connection.
        self.accept.abort();
    }
}
