//! How the client side proves who it is and whom it talks to: TLS settings (the CA that
//! signed the replicas' certificates, and an optional client certificate), the bearer
//! token sent as `authorization: Bearer …` on every request, and [`ConnectArgs`], the
//! flags that `dispatchctl` and the `taskmanager` share to set them.
//!
//! It reads the files it is pointed at and nothing else. It must never print, log or
//! `Debug`-format a secret: a token's `Debug` is `<redacted>`, and so is a private key's.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use tonic::{Request, Status};

/// The metadata key of the bearer token.
pub const AUTHORIZATION: &str = "authorization";

/// A setting that cannot be used: a file that cannot be read or holds no usable PEM, a
/// token that cannot travel in a header, or flags that do not go together.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    /// A file could not be read.
    #[error("{what} {}: cannot read it: {source}", .path.display())]
    Read {
        /// What the file should hold (`CA certificate file`).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file (or in-memory PEM) holds nothing usable.
    #[error("{what}{}: {reason}", spaced(.origin))]
    Invalid {
        /// What it should hold.
        what: &'static str,
        /// The file, `(in memory)`, or empty for a secret given inline.
        origin: String,
        /// Why it is unusable.
        reason: String,
    },
    /// Flags or settings that do not go together.
    #[error("{0}")]
    Usage(String),
}

fn spaced(origin: &str) -> String {
    if origin.is_empty() {
        String::new()
    } else {
        format!(" {origin}")
    }
}

fn origin(path: Option<&Path>) -> String {
    path.map_or_else(|| "(in memory)".to_string(), |p| p.display().to_string())
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, SecurityError> {
    std::fs::read(path).map_err(|source| SecurityError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// A bearer token. Its `Debug` (and so every config that holds it) prints `<redacted>`;
/// the header value it becomes is marked sensitive, so HTTP/2 never indexes it either.
#[derive(Clone)]
pub struct Token {
    header: MetadataValue<Ascii>,
}

impl Token {
    /// A token from its secret. Surrounding whitespace (a file's final newline) is
    /// trimmed; an empty secret, or one that cannot travel in an HTTP header (anything
    /// but visible ASCII), is refused.
    pub fn new(secret: &str) -> Result<Self, SecurityError> {
        Self::parse(secret, None)
    }

    /// A token read from a file (its whole content, trimmed).
    pub fn from_file(path: &Path) -> Result<Self, SecurityError> {
        let raw = read("token file", path)?;
        let text = String::from_utf8(raw).map_err(|_| SecurityError::Invalid {
            what: "token file",
            origin: origin(Some(path)),
            reason: "is not UTF-8 text".into(),
        })?;
        Self::parse(&text, Some(path))
    }

    fn parse(secret: &str, path: Option<&Path>) -> Result<Self, SecurityError> {
        let invalid = |reason: &str| SecurityError::Invalid {
            what: if path.is_some() {
                "token file"
            } else {
                "token"
            },
            origin: path.map_or_else(String::new, |p| p.display().to_string()),
            reason: reason.to_string(),
        };
        let secret = secret.trim();
        if secret.is_empty() {
            return Err(invalid("is empty"));
        }
        // The message must not quote the secret, not even a part of it.
        if !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(
                "may hold only visible ASCII characters (no spaces or control characters)",
            ));
        }
        let mut header: MetadataValue<Ascii> = format!("Bearer {secret}")
            .parse()
            .map_err(|_| invalid("cannot be sent in a header"))?;
        header.set_sensitive(true);
        Ok(Token { header })
    }

    /// The secret itself, to hand on (write it to a file, pass it to a child process).
    /// Never log it.
    pub fn secret(&self) -> &str {
        self.header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .unwrap_or_default()
    }

    /// The `authorization` metadata value: `Bearer <secret>`, marked sensitive.
    pub fn header(&self) -> &MetadataValue<Ascii> {
        &self.header
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl PartialEq for Token {
    fn eq(&self, other: &Self) -> bool {
        self.header.as_bytes() == other.header.as_bytes()
    }
}

impl Eq for Token {}

impl FromStr for Token {
    type Err = SecurityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Token::new(s)
    }
}

/// TLS settings of a client: the CA certificates that a replica's certificate must chain
/// to (there are no default roots: a cluster has its own CA), and optionally a client
/// certificate and key to present. The PEM is checked when the settings are made, so a
/// wrong file is named then, not at the first connection.
#[derive(Clone)]
pub struct TlsConfig {
    ca_pem: Vec<u8>,
    ca_certificates: usize,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    described: String,
}

impl TlsConfig {
    /// Trusts the CA certificates in `ca_pem` (one or more PEM `CERTIFICATE` blocks).
    pub fn from_pem(ca_pem: impl Into<Vec<u8>>) -> Result<Self, SecurityError> {
        Self::with_ca(ca_pem.into(), None)
    }

    /// Trusts the CA certificates in the PEM file `ca`.
    pub fn from_ca_file(ca: &Path) -> Result<Self, SecurityError> {
        Self::with_ca(read("CA certificate file", ca)?, Some(ca))
    }

    /// As [`TlsConfig::from_ca_file`], presenting the client certificate `cert` (PEM,
    /// the certificate first, then any intermediates) with its private key `key` when
    /// `identity` is given.
    pub fn from_files(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<Self, SecurityError> {
        let tls = Self::from_ca_file(ca)?;
        match identity {
            None => Ok(tls),
            Some((cert, key)) => tls.identity_checked(
                read("client certificate file", cert)?,
                Some(cert),
                read("client key file", key)?,
                Some(key),
            ),
        }
    }

    /// Presents the client certificate `cert_pem` with its private key `key_pem`.
    pub fn with_identity(
        self,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Result<Self, SecurityError> {
        self.identity_checked(cert_pem.into(), None, key_pem.into(), None)
    }

    fn with_ca(ca_pem: Vec<u8>, path: Option<&Path>) -> Result<Self, SecurityError> {
        let ca_certificates = certificates("CA certificate file", &ca_pem, path)?;
        Ok(TlsConfig {
            ca_pem,
            ca_certificates,
            identity: None,
            described: origin(path),
        })
    }

    fn identity_checked(
        mut self,
        cert: Vec<u8>,
        cert_path: Option<&Path>,
        key: Vec<u8>,
        key_path: Option<&Path>,
    ) -> Result<Self, SecurityError> {
        certificates("client certificate file", &cert, cert_path)?;
        // The parse error says what kind of section it missed; it never holds key bytes.
        PrivateKeyDer::from_pem_slice(&key).map_err(|e| SecurityError::Invalid {
            what: "client key file",
            origin: origin(key_path),
            reason: format!("no usable PEM private key ({e})"),
        })?;
        self.identity = Some((cert, key));
        Ok(self)
    }

    /// Whether a client certificate is presented.
    pub fn has_identity(&self) -> bool {
        self.identity.is_some()
    }

    /// The PEM of the trusted CA certificates.
    pub fn ca_pem(&self) -> &[u8] {
        &self.ca_pem
    }

    /// tonic's TLS settings for one connection.
    pub fn client_tls_config(&self) -> ClientTlsConfig {
        let config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem));
        match &self.identity {
            Some((cert, key)) => config.identity(Identity::from_pem(cert, key)),
            None => config,
        }
    }
}

fn certificates(
    what: &'static str,
    pem: &[u8],
    path: Option<&Path>,
) -> Result<usize, SecurityError> {
    let invalid = |reason: String| SecurityError::Invalid {
        what,
        origin: origin(path),
        reason,
    };
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        cert.map_err(|e| invalid(format!("unreadable PEM ({e})")))?;
        count += 1;
    }
    if count == 0 {
        return Err(invalid("holds no PEM certificate".into()));
    }
    Ok(count)
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("ca", &self.described)
            .field("ca_certificates", &self.ca_certificates)
            .field(
                "client_identity",
                &self.identity.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// Puts the bearer token, if there is one, on every request that does not carry its own
/// `authorization` already.
#[derive(Clone, Default)]
pub struct BearerAuth {
    token: Option<Token>,
}

impl BearerAuth {
    /// Sends `token` (or nothing).
    pub fn new(token: Option<Token>) -> Self {
        BearerAuth { token }
    }
}

impl fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BearerAuth")
            .field("token", &self.token)
            .finish()
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.token {
            let metadata = request.metadata_mut();
            if !metadata.contains_key(AUTHORIZATION) {
                metadata.insert(AUTHORIZATION, token.header().clone());
            }
        }
        Ok(request)
    }
}

/// Parses `--token` without ever quoting the value in an error, as clap's own parsers
/// would.
#[derive(Clone, Copy, Debug)]
struct TokenParser;

impl clap::builder::TypedValueParser for TokenParser {
    type Value = Token;

    fn parse_ref(
        &self,
        _cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<Token, clap::Error> {
        let flag = arg.map_or_else(|| "--token".to_string(), |a| a.to_string());
        let refuse = |reason: String| {
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("invalid value for '{flag}': {reason}\n"),
            )
        };
        let text = value
            .to_str()
            .ok_or_else(|| refuse("the token is not UTF-8 text".into()))?;
        Token::new(text).map_err(|e| refuse(e.to_string()))
    }
}

/// The connection flags shared by `dispatchctl` and the `taskmanager`: TLS (`--ca`, and
/// `--cert`/`--key` for a client certificate) and the bearer token (`--token` or
/// `--token-file`), each also from a `DISPATCHER_*` environment variable.
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Args)]
pub struct ConnectArgs {
    /// Connect with TLS, trusting the CA certificate(s) in this PEM file (the CA that
    /// signed the replicas' certificates, e.g. `ca.crt` of `dispatchctl dev-certs`).
    #[arg(long, env = "DISPATCHER_CA", value_name = "FILE", global = true)]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) to present over TLS; needs --key and --ca.
    #[arg(long, env = "DISPATCHER_CERT", value_name = "FILE", global = true)]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long, env = "DISPATCHER_KEY", value_name = "FILE", global = true)]
    pub key: Option<PathBuf>,
    /// Bearer token sent with every call. Prefer --token-file: a command line is visible
    /// to every user of the machine.
    #[arg(
        long,
        env = "DISPATCHER_TOKEN",
        value_name = "SECRET",
        hide_env_values = true,
        global = true,
        value_parser = TokenParser
    )]
    pub token: Option<Token>,
    /// File holding the bearer token (surrounding whitespace is ignored).
    #[arg(
        long,
        env = "DISPATCHER_TOKEN_FILE",
        value_name = "FILE",
        global = true
    )]
    pub token_file: Option<PathBuf>,
}

impl ConnectArgs {
    /// The TLS settings, read from the files named; `None` without `--ca`.
    pub fn tls(&self) -> Result<Option<TlsConfig>, SecurityError> {
        let identity =
            match (&self.cert, &self.key) {
                (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
                (None, None) => None,
                (Some(_), None) => return Err(SecurityError::Usage(
                    "--cert (DISPATCHER_CERT) needs --key (DISPATCHER_KEY): give both or neither"
                        .into(),
                )),
                (None, Some(_)) => return Err(SecurityError::Usage(
                    "--key (DISPATCHER_KEY) needs --cert (DISPATCHER_CERT): give both or neither"
                        .into(),
                )),
            };
        match &self.ca {
            Some(ca) => TlsConfig::from_files(ca, identity).map(Some),
            None if identity.is_some() => Err(SecurityError::Usage(
                "--cert and --key need --ca (DISPATCHER_CA): the CA that signed the replicas' \
                 certificates"
                    .into(),
            )),
            None => Ok(None),
        }
    }

    /// The bearer token, from `--token` or read from `--token-file`; `None` without
    /// either. Both at once (from flags or the environment) is refused rather than one
    /// silently winning.
    pub fn token(&self) -> Result<Option<Token>, SecurityError> {
        match (&self.token, &self.token_file) {
            (Some(_), Some(_)) => Err(SecurityError::Usage(
                "both a token (--token or DISPATCHER_TOKEN) and a token file (--token-file or \
                 DISPATCHER_TOKEN_FILE) are given: use one"
                    .into(),
            )),
            (Some(t), None) => Ok(Some(t.clone())),
            (None, Some(path)) => Token::from_file(path).map(Some),
            (None, None) => Ok(None),
        }
    }

    /// Sets `config`'s TLS settings and token from these flags.
    pub fn configure(&self, config: &mut super::ClientConfig) -> Result<(), SecurityError> {
        config.tls = self.tls()?;
        config.token = self.token()?;
        Ok(())
    }
}

/// The URI to dial for `addr`: `host:port` becomes `https://host:port` with TLS and
/// `http://host:port` without; an explicit scheme must match.
pub(crate) fn endpoint_uri(addr: &str, tls: bool) -> Result<String, String> {
    match (
        addr.strip_prefix("https://"),
        addr.strip_prefix("http://"),
        tls,
    ) {
        (Some(_), _, true) | (_, Some(_), false) => Ok(addr.to_string()),
        (Some(_), _, false) => {
            Err("an https:// address needs TLS settings (--ca FILE or DISPATCHER_CA)".to_string())
        }
        (_, Some(_), true) => Err(
            "an http:// address with TLS settings (--ca): give host:port or https://host:port"
                .to_string(),
        ),
        (None, None, true) => Ok(format!("https://{addr}")),
        (None, None, false) => Ok(format!("http://{addr}")),
    }
}

#[cfg(test)]
mod tests;
