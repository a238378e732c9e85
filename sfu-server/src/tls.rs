//! HTTPS and WSS: a TLS listener for the HTTP server, from a configured
//! certificate and key or a self-signed certificate made at start.
//!
//! TLS handshakes run in their own tasks, with a time limit, so a client
//! that opens a connection and never finishes its handshake cannot hold
//! up anyone else's.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Finished handshakes waiting for the HTTP server to take them.
const READY_QUEUE: usize = 128;

/// A certificate chain and its private key, PEM.
pub struct Identity {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl Identity {
    pub fn from_files(cert: &Path, key: &Path) -> anyhow::Result<Identity> {
        Ok(Identity {
            cert_pem: std::fs::read(cert)
                .with_context(|| format!("reading TLS certificate {}", cert.display()))?,
            key_pem: std::fs::read(key)
                .with_context(|| format!("reading TLS key {}", key.display()))?,
        })
    }

    /// A self-signed certificate for `names` (host names or IP addresses),
    /// for development off localhost: browsers need a secure context for
    /// the camera, and accept this one once the user says so.
    pub fn self_signed(names: Vec<String>) -> anyhow::Result<Identity> {
        let certified = rcgen::generate_simple_self_signed(names)
            .context("making a self-signed certificate")?;
        Ok(Identity {
            cert_pem: certified.cert.pem().into_bytes(),
            key_pem: certified.signing_key.serialize_pem().into_bytes(),
        })
    }

    pub fn server_config(&self) -> anyhow::Result<rustls::ServerConfig> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&self.cert_pem)
            .collect::<Result<_, _>>()
            .context("parsing the TLS certificate (PEM)")?;
        anyhow::ensure!(
            !certs.is_empty(),
            "the TLS certificate file has no certificate"
        );
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem)
            .context("parsing the TLS private key (PEM)")?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .context("the TLS certificate does not match its key")?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// Accepts TCP connections, runs their handshakes, and hands finished TLS
/// streams to the HTTP server.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    _acceptor: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    pub fn new(listener: TcpListener, identity: &Identity) -> anyhow::Result<TlsListener> {
        let acceptor = TlsAcceptor::from(Arc::new(identity.server_config()?));
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(READY_QUEUE);
        let task = tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: wait, retry.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener {
            ready,
            local,
            _acceptor: task,
        })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The accept task ended; nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}
