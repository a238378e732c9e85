//! HTTPS/WSS with a self-signed certificate, the HTTPS redirect behind a
//! proxy, and CORS: the real server on port 0, real TLS clients.

mod common;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use sfu_server::RunningServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message;

async fn start(config: sfu_server::Config) -> RunningServer {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
    sfu_server::start(&config).await.expect("server starts")
}

/// A TLS connection to the server that trusts its (self-signed) certificate.
async fn tls_connect(server: &RunningServer) -> TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = server.tls_cert_pem.as_ref().expect("TLS is on");
    for cert in CertificateDer::pem_slice_iter(pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(server.http_addr).await.unwrap();
    connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake")
}

/// One HTTP/1.1 request over any stream; the whole response as text.
async fn request<S>(mut stream: S, text: &str) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream.write_all(text.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out))
        .await
        .expect("response within 5 s")
        .ok();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn https_and_wss_with_a_self_signed_certificate() {
    let mut config = common::test_config();
    config.tls_self_signed = true;
    let server = start(config).await;
    assert!(server.base_url().starts_with("https://"));

    // A client that connects and never starts its handshake holds up
    // no one.
    let _idle = TcpStream::connect(server.http_addr).await.unwrap();

    let tls = tls_connect(&server).await;
    let response = request(
        tls,
        "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains(r#""status":"ok""#), "{response}");

    // Signalling over WSS: join and get `joined`.
    let token = common::join_token(&server, "secure", "alice");
    let url = format!(
        "wss://localhost:{}/v1/rtc?access_token={token}",
        server.http_addr.port()
    );
    let (mut ws, _) = tokio_tungstenite::client_async(url, tls_connect(&server).await)
        .await
        .expect("WebSocket over TLS");
    let joined = loop {
        let frame = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a message within 5 s")
            .expect("open")
            .expect("frame");
        if let Message::Text(t) = frame {
            break serde_json::from_str::<Value>(&t).unwrap();
        }
    };
    assert_eq!(joined["type"], "joined");

    // Plain HTTP on the TLS port gets no HTTP answer.
    let plain = TcpStream::connect(server.http_addr).await.unwrap();
    let response = request(
        plain,
        "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(!response.contains("200 OK"), "{response}");
}

#[tokio::test]
async fn tls_settings_that_do_not_fit_are_refused() {
    let mut config = common::test_config();
    config.tls_cert = Some("/nonexistent/cert.pem".into());
    config.tls_key = Some("/nonexistent/key.pem".into());
    let e = sfu_server::start(&config).await.err().expect("refused");
    assert!(e.to_string().contains("cert.pem"), "{e}");
    let mut config = common::test_config();
    config.tls_cert = Some("/nonexistent/cert.pem".into());
    let e = sfu_server::start(&config).await.err().expect("refused");
    assert!(e.to_string().contains("--tls-key"), "{e}");
}

#[tokio::test]
async fn plain_http_behind_a_proxy_is_redirected_to_https() {
    let mut config = common::test_config();
    config.https_redirect = true;
    let server = start(config).await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = http
        .get(format!("{}/v1/rooms?x=1", server.base_url()))
        .header("x-forwarded-proto", "http")
        .header("host", "sfu.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 308);
    assert_eq!(
        resp.headers()["location"],
        "https://sfu.example.com/v1/rooms?x=1"
    );
    // What the proxy received over HTTPS is served.
    let resp = http
        .get(format!("{}/healthz", server.base_url()))
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
}

#[tokio::test]
async fn cors_allows_only_the_configured_origins() {
    let mut config = common::test_config();
    config.cors_origins = vec!["https://app.example".into()];
    let server = start(config).await;
    let http = reqwest::Client::new();
    let preflight = |origin: &'static str| {
        http.request(
            reqwest::Method::OPTIONS,
            format!("{}/v1/rooms", server.base_url()),
        )
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type",
        )
        .send()
    };
    let ok = preflight("https://app.example").await.unwrap();
    assert_eq!(
        ok.headers()
            .get("access-control-allow-origin")
            .map(|v| v.to_str().unwrap()),
        Some("https://app.example")
    );
    let other = preflight("https://elsewhere.example").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());

    // Without configured origins there are no CORS headers at all.
    let plain = start(common::test_config()).await;
    let resp = http
        .get(format!("{}/healthz", plain.base_url()))
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert!(resp.headers().get("access-control-allow-origin").is_none());
}
