//! TLS for a server behind HTTPS and WSS, as a production deployment is:
//! the web PKI's roots, plus the certificates given to [`trust`] (a
//! private certificate authority, or a server's self-signed certificate).
//! One trust store for the process, used by every REST call and every
//! signalling socket (plain `http://` and `ws://` URLs are unaffected).

use std::path::Path;
use std::sync::{Arc, LazyLock, RwLock};

use anyhow::Context as _;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Response;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

/// Certificates trusted besides the web PKI's roots.
static EXTRA: RwLock<Vec<CertificateDer<'static>>> = RwLock::new(Vec::new());
/// The client configuration built from them, rebuilt when they change.
static CONFIG: LazyLock<RwLock<Arc<ClientConfig>>> =
    LazyLock::new(|| RwLock::new(Arc::new(build(&[]))));

fn build(extra: &[CertificateDer<'static>]) -> ClientConfig {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    // Checked by `trust` before they get here.
    let (_added, _ignored) = roots.add_parsable_certificates(extra.iter().cloned());
    ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// Trusts the certificates in the PEM file at `path` from now on, besides
/// the web PKI's roots.
pub fn trust(path: &Path) -> anyhow::Result<()> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing {} (PEM)", path.display()))?;
    anyhow::ensure!(!certs.is_empty(), "{} holds no certificate", path.display());
    let mut check = RootCertStore::empty();
    let (_, ignored) = check.add_parsable_certificates(certs.iter().cloned());
    anyhow::ensure!(
        ignored == 0,
        "{}: {ignored} certificate(s) could not be used as trust anchors",
        path.display()
    );
    let mut extra = EXTRA.write().expect("trust store lock");
    extra.extend(certs);
    *CONFIG.write().expect("tls config lock") = Arc::new(build(&extra));
    Ok(())
}

fn config() -> Arc<ClientConfig> {
    CONFIG.read().expect("tls config lock").clone()
}

/// An HTTP client for the server's REST API and metrics.
pub fn http() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .use_preconfigured_tls((*config()).clone())
        .build()
        .context("building the HTTP client")
}

/// Opens a WebSocket (`ws://` or `wss://`).
pub async fn connect(
    request: impl IntoClientRequest + Unpin,
) -> anyhow::Result<(WebSocketStream<MaybeTlsStream<TcpStream>>, Response)> {
    tokio_tungstenite::connect_async_tls_with_config(
        request,
        None,
        false,
        Some(Connector::Rustls(config())),
    )
    .await
    .context("opening the signalling socket")
    .map_err(explain)
}

/// Adds what to do to an error that a server's certificate was refused.
pub fn explain(e: anyhow::Error) -> anyhow::Error {
    if e.chain()
        .any(|c| c.to_string().contains("invalid peer certificate"))
    {
        e.context("the server's TLS certificate is not trusted (for a private or self-signed one, pass it with --ca-cert)")
    } else {
        e
    }
}
