//! TLS material of a replica: its certificate and key (served to clients and presented
//! to peers), and the cluster's CA (which client and peer certificates must chain to).
//! rustls through tonic's TLS feature; nothing here implements any cryptography.
//!
//! A replica's certificate must carry the DNS name `replica-<id>`: peers dial each other
//! expecting that name (so a peer is verified to be the replica it is meant to be, not
//! just any holder of a certificate of the CA), and the RaftService accepts a message
//! only from a client certificate valid for the sender's `replica-<id>`. It also carries
//! the names clients dial (host names, IP addresses). `dispatchctl dev-certs` writes such
//! certificates.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

use crate::raft::NodeId;

/// How long a client has to complete its TLS handshake.
pub const TLS_HANDSHAKE_WITHIN: Duration = Duration::from_secs(10);

/// The three files, as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// This replica's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The cluster's CA certificate(s) (PEM).
    pub ca: PathBuf,
}

/// TLS material that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read or holds no usable PEM item.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn certificates(path: &Path, pem: &[u8]) -> Result<(), TlsError> {
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        cert.map_err(|e| TlsError::File {
            path: path.to_path_buf(),
            reason: format!("not a PEM certificate: {e}"),
        })?;
        count += 1;
    }
    if count == 0 {
        return Err(TlsError::File {
            path: path.to_path_buf(),
            reason: "holds no PEM certificate".into(),
        });
    }
    Ok(())
}

/// A replica's loaded TLS material.
#[derive(Clone, Debug)]
pub struct ReplicaTls {
    /// For the listener.
    pub server: ServerTlsConfig,
    /// For dialing peers.
    pub peer: PeerTls,
}

/// What a replica presents and trusts when it dials a peer.
#[derive(Clone, Debug)]
pub struct PeerTls {
    identity: Identity,
    ca: Certificate,
}

/// Reads and checks the files; every error names the file.
pub fn load(files: &TlsFiles) -> Result<ReplicaTls, TlsError> {
    let cert = read(&files.cert)?;
    certificates(&files.cert, &cert)?;
    let key = read(&files.key)?;
    PrivateKeyDer::from_pem_slice(&key).map_err(|e| TlsError::File {
        path: files.key.clone(),
        reason: format!("no usable PEM private key: {e}"),
    })?;
    let ca = read(&files.ca)?;
    certificates(&files.ca, &ca)?;
    let identity = Identity::from_pem(cert, key);
    let ca = Certificate::from_pem(ca);
    // Client certificates are optional at the handshake: clients and TaskManagers
    // authenticate with tokens, and may present a certificate; replicas must (the edge
    // refuses peer traffic without one).
    let server = ServerTlsConfig::new()
        .identity(identity.clone())
        .client_ca_root(ca.clone())
        .client_auth_optional(true)
        // A handshake dribbled a byte at a time would hold a connection's place forever.
        .timeout(TLS_HANDSHAKE_WITHIN);
    Ok(ReplicaTls {
        server,
        peer: PeerTls { identity, ca },
    })
}

/// An endpoint to replica `id` at `addr`: plain HTTP/2 without TLS; with TLS, the
/// replica's own certificate as client identity, the cluster CA as the only root, and
/// the peer's certificate required to be valid for `replica-<id>`.
pub fn peer_endpoint(id: NodeId, addr: &str, tls: Option<&PeerTls>) -> Result<Endpoint, String> {
    let Some(tls) = tls else {
        return Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| format!("bad peer address {addr:?}: {e}"));
    };
    let config = ClientTlsConfig::new()
        .ca_certificate(tls.ca.clone())
        .identity(tls.identity.clone())
        .domain_name(format!("replica-{id}"));
    Endpoint::from_shared(format!("https://{addr}"))
        .map_err(|e| format!("bad peer address {addr:?}: {e}"))?
        .tls_config(config)
        .map_err(|e| format!("TLS settings for replica {id}: {e}"))
}

/// The HTTPS configuration of the HTTP listener: the replica's own certificate and key,
/// no client certificate asked for (browsers and Flink's CLI authenticate with tokens).
pub fn http_server_config(
    files: &TlsFiles,
) -> Result<std::sync::Arc<rustls::ServerConfig>, TlsError> {
    let cert = read(&files.cert)?;
    let chain = CertificateDer::pem_slice_iter(&cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::File {
            path: files.cert.clone(),
            reason: format!("not a PEM certificate: {e}"),
        })?;
    let key = PrivateKeyDer::from_pem_slice(&read(&files.key)?).map_err(|e| TlsError::File {
        path: files.key.clone(),
        reason: format!("no usable PEM private key: {e}"),
    })?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key))
        .map_err(|e| TlsError::File {
            path: files.cert.clone(),
            reason: format!("unusable for HTTPS: {e}"),
        })?;
    // axum serves HTTP/1.1 here (its http2 feature is off).
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(std::sync::Arc::new(config))
}
