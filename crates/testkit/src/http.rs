//! One HTTP/1.1 call to a replica's HTTP listener, for the end-to-end tests: plain, or
//! HTTPS trusting only the cluster's CA, with an optional bearer token. hyper and
//! rustls do the protocol; this only wires them.

use std::path::Path;
use std::sync::Arc;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};

/// An answer: status, content type and body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

impl Answer {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// `method url` with `token` as bearer; `ca` makes it HTTPS trusting that CA only.
pub async fn call(method: &str, url: &str, token: Option<&str>, ca: Option<&Path>) -> Answer {
    let uri: hyper::Uri = url.parse().expect("a URL");
    let host = uri.host().expect("a host").to_string();
    let port = uri.port_u16().expect("a port");
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .expect("connect");
    let path = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, format!("{host}:{port}"));
    if let Some(t) = token {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req.body(Empty::<Bytes>::new()).expect("request");
    let resp = match ca {
        None => send(TokioIo::new(tcp), req).await,
        Some(ca) => {
            let pem = std::fs::read(ca).expect("the CA file");
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&pem) {
                roots.add(cert.expect("a PEM certificate")).expect("a CA");
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("TLS versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
            let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
            let name = ServerName::try_from(host.clone()).expect("a server name");
            let tls = connector.connect(name, tcp).await.expect("TLS handshake");
            send(TokioIo::new(tls), req).await
        }
    };
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    Answer {
        status,
        content_type,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

async fn send<IO>(
    io: IO,
    req: hyper::Request<Empty<Bytes>>,
) -> hyper::Response<hyper::body::Incoming>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .expect("HTTP handshake");
    tokio::spawn(conn);
    sender.send_request(req).await.expect("HTTP answer")
}
