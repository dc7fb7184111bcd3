//! `dispatchctl dev-certs`: a development CA, certificates for the replicas, a TaskManager
//! and a client, and a first admin token, written as PEM files into one directory.
//!
//! For development and tests only: the CA key lies next to what it signed. It writes
//! nothing until every name was checked and no file would be overwritten (unless
//! `--force`); private keys and the token are created with mode 0600, never readable by
//! other users at any moment.
//!
//! Run again on a directory that holds `ca.crt` and `ca.key` (without `--force`), it
//! signs with that CA and writes only what is missing: `--replicas 4` then adds
//! `replica-4` for a replica joining the cluster, trusted by everyone who trusts the CA.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose as Eku, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// How long the development CA is valid.
pub const CA_VALID_DAYS: i64 = 3650;
/// How long the replica, TaskManager and client certificates are valid.
pub const LEAF_VALID_DAYS: i64 = 825;
/// The CA certificate's file name.
pub const CA_CERT: &str = "ca.crt";
/// The admin token's file name.
pub const ADMIN_TOKEN: &str = "admin.token";

/// Flags of `dispatchctl dev-certs`.
#[derive(Clone, Debug, clap::Args)]
pub struct DevCertsArgs {
    /// Directory to write into (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Number of replica certificates: replica-1 to replica-N (1 to 99).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=99))]
    pub replicas: u32,
    /// Another name (DNS name or IP address) for every replica certificate; repeatable.
    #[arg(long = "host", value_name = "NAME")]
    pub hosts: Vec<String>,
    /// Overwrite files that exist.
    #[arg(long)]
    pub force: bool,
}

/// Why nothing, or not everything, was written.
#[derive(Debug, thiserror::Error)]
pub enum DevCertsError {
    /// A `--host` that is neither a DNS name nor an IP address.
    #[error("--host {name:?} is neither a DNS name nor an IP address")]
    Host {
        /// The name given.
        name: String,
    },
    /// Files exist and `--force` was not given.
    #[error("refusing to overwrite {} (pass --force to replace them)", list(.0))]
    Exists(Vec<PathBuf>),
    /// Key or certificate generation failed.
    #[error("cannot make the {what}: {reason}")]
    Generate {
        /// What was being made.
        what: String,
        /// rcgen's reason.
        reason: String,
    },
    /// A file or the directory could not be written.
    #[error("cannot write {}: {source}", .path.display())]
    Write {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

fn list(paths: &[PathBuf]) -> String {
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    names.join(", ")
}

/// One file to write. Its `Debug` leaves out the contents: keys and the token are secrets.
pub struct PemFile {
    /// Its path.
    pub path: PathBuf,
    /// What it holds, for the listing.
    pub what: String,
    contents: String,
    secret: bool,
}

impl std::fmt::Debug for PemFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PemFile")
            .field("path", &self.path)
            .field("what", &self.what)
            .field("secret", &self.secret)
            .finish_non_exhaustive()
    }
}

/// What `dev-certs` wrote.
#[derive(Debug)]
pub struct Written {
    /// The directory, absolute when it could be resolved.
    pub dir: PathBuf,
    /// Every file, in the order written.
    pub files: Vec<PemFile>,
}

impl Written {
    /// The CA certificate to pass as `--ca` / `DISPATCHER_CA`.
    pub fn ca(&self) -> PathBuf {
        self.dir.join(CA_CERT)
    }

    /// The admin token file, for `--token-file` / `DISPATCHER_TOKEN_FILE` and
    /// `dispatcher --bootstrap-token-file`.
    pub fn admin_token(&self) -> PathBuf {
        self.dir.join(ADMIN_TOKEN)
    }
}

/// The DNS names of replica `id`'s certificate, before `--host`s: the name a peer's
/// certificate is recognised by (`replica-<id>`), localhost, and the names of the compose
/// and Kubernetes deployments.
pub fn replica_names(id: u32) -> Vec<String> {
    vec![
        format!("replica-{id}"),
        "localhost".to_string(),
        format!("dispatcher-{id}"),
        format!("dispatcher-{id}.dispatcher"),
    ]
}

fn generate_err(what: &str) -> impl Fn(rcgen::Error) -> DevCertsError + '_ {
    move |e| DevCertsError::Generate {
        what: what.to_string(),
        reason: e.to_string(),
    }
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    // An hour back, for clocks that lag the one that made the certificate.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days);
}

fn common_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn san(name: &str) -> Result<SanType, DevCertsError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'*')
        });
    let invalid = || DevCertsError::Host {
        name: name.to_string(),
    };
    if !valid {
        return Err(invalid());
    }
    Ok(SanType::DnsName(
        name.to_string().try_into().map_err(|_| invalid())?,
    ))
}

fn leaf(
    ca: &Issuer<'_, KeyPair>,
    cn: &str,
    names: &[SanType],
    usages: Vec<Eku>,
) -> Result<(String, String), DevCertsError> {
    let what = format!("certificate of {cn}");
    let key = KeyPair::generate().map_err(generate_err(&what))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(cn);
    params.subject_alt_names = names.to_vec();
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = usages;
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, LEAF_VALID_DAYS);
    let cert = params.signed_by(&key, ca).map_err(generate_err(&what))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A random 256-bit secret from the operating system, hex-encoded.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Makes every key, certificate and the token in memory, under a new CA (nothing is
/// written).
pub fn generate(args: &DevCertsArgs) -> Result<Vec<PemFile>, DevCertsError> {
    generate_under(args, None)
}

/// The CA in `dir`, when both its certificate and its key are there.
fn existing_ca(dir: &Path) -> Result<Option<Issuer<'static, KeyPair>>, DevCertsError> {
    let (cert, key) = (dir.join(CA_CERT), dir.join("ca.key"));
    if !cert.exists() || !key.exists() {
        return Ok(None);
    }
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| DevCertsError::Write {
            path: path.to_path_buf(),
            source,
        })
    };
    let unusable = |path: &Path, e: rcgen::Error| DevCertsError::Generate {
        what: format!("CA from {}", path.display()),
        reason: e.to_string(),
    };
    let signing_key = KeyPair::from_pem(&read(&key)?).map_err(|e| unusable(&key, e))?;
    Issuer::from_ca_cert_pem(&read(&cert)?, signing_key)
        .map(Some)
        .map_err(|e| unusable(&cert, e))
}

/// As [`generate`], signing with `existing` (and writing no CA files) when given.
fn generate_under(
    args: &DevCertsArgs,
    existing: Option<&Issuer<'_, KeyPair>>,
) -> Result<Vec<PemFile>, DevCertsError> {
    let extra: Vec<SanType> = args
        .hosts
        .iter()
        .map(|h| san(h))
        .collect::<Result<_, _>>()?;
    let dir = &args.out;
    let mut files = Vec::new();
    let mut add = |name: String, what: String, contents: String, secret: bool| {
        files.push(PemFile {
            path: dir.join(name),
            what,
            contents,
            secret,
        })
    };

    let fresh;
    let ca: &Issuer<'_, KeyPair> = match existing {
        Some(issuer) => issuer,
        None => {
            fresh = new_ca()?;
            add(
                CA_CERT.into(),
                "development CA certificate (--ca, --tls-ca)".into(),
                fresh.pem(),
                false,
            );
            add(
                "ca.key".into(),
                "development CA key (keep it to sign more; never deploy it)".into(),
                fresh.key().serialize_pem(),
                true,
            );
            &fresh
        }
    };

    let localhost = [
        SanType::IpAddress(IpAddr::from([127, 0, 0, 1])),
        SanType::IpAddress(IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1])),
    ];
    for id in 1..=args.replicas {
        let cn = format!("replica-{id}");
        let mut names = replica_names(id)
            .iter()
            .map(|n| san(n))
            .collect::<Result<Vec<_>, _>>()?;
        names.extend(localhost.iter().cloned());
        names.extend(extra.iter().cloned());
        // Replicas dial each other with the same certificate: client and server.
        let (cert, key) = leaf(ca, &cn, &names, vec![Eku::ServerAuth, Eku::ClientAuth])?;
        add(
            format!("{cn}.crt"),
            format!("certificate of replica {id} (--tls-cert)"),
            cert,
            false,
        );
        add(
            format!("{cn}.key"),
            format!("key of replica {id} (--tls-key)"),
            key,
            true,
        );
    }
    let (cert, key) = leaf(
        ca,
        "taskmanager",
        &[san("taskmanager")?],
        vec![Eku::ClientAuth],
    )?;
    add(
        "taskmanager.crt".into(),
        "TaskManager client certificate (--cert)".into(),
        cert,
        false,
    );
    add(
        "taskmanager.key".into(),
        "TaskManager client key (--key)".into(),
        key,
        true,
    );
    let (cert, key) = leaf(ca, "client", &[], vec![Eku::ClientAuth])?;
    add(
        "client.crt".into(),
        "client certificate (--cert)".into(),
        cert,
        false,
    );
    add("client.key".into(), "client key (--key)".into(), key, true);
    add(
        ADMIN_TOKEN.into(),
        "admin token (--token-file; dispatcher --bootstrap-token-file)".into(),
        format!("{}\n", new_secret()),
        true,
    );
    Ok(files)
}

/// A new development CA.
fn new_ca() -> Result<CertifiedIssuer<'static, KeyPair>, DevCertsError> {
    let ca_key = KeyPair::generate().map_err(generate_err("CA key"))?;
    let mut ca_params = CertificateParams::default();
    // A name of its own, so that two development CAs are told apart (in errors too: a
    // certificate of another one is of an unknown issuer, not a bad signature).
    let ca_name = format!("dispatcher development CA {}", &new_secret()[..8]);
    ca_params.distinguished_name = common_name(&ca_name);
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut ca_params, CA_VALID_DAYS);
    CertifiedIssuer::self_signed(ca_params, ca_key).map_err(generate_err("development CA"))
}

fn write_file(file: &PemFile) -> Result<(), DevCertsError> {
    let err = |source| DevCertsError::Write {
        path: file.path.clone(),
        source,
    };
    let mode = if file.secret { 0o600 } else { 0o644 };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&file.path)
        .map_err(err)?;
    // `mode` applies only to a new file: one replaced under --force keeps its old
    // permissions unless they are set again.
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(err)?;
    f.write_all(file.contents.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)
}

/// Generates everything, then writes it into `args.out`; refuses before writing anything
/// if a file exists and `args.force` is not set.
pub fn run(args: &DevCertsArgs) -> Result<Written, DevCertsError> {
    let existing = if args.force {
        None
    } else {
        existing_ca(&args.out)?
    };
    let mut files = generate_under(args, existing.as_ref())?;
    if existing.is_some() {
        // Signing with the directory's CA: keep every pair that is there (a key and its
        // certificate go together), write the rest.
        let stem = |f: &PemFile| f.path.with_extension("");
        let present: std::collections::BTreeSet<PathBuf> = files
            .iter()
            .filter(|f| f.path.symlink_metadata().is_ok())
            .map(stem)
            .collect();
        let mut all = vec![args.out.join(CA_CERT), args.out.join("ca.key")];
        all.extend(files.iter().map(|f| f.path.clone()));
        files.retain(|f| !present.contains(&stem(f)));
        if files.is_empty() {
            return Err(DevCertsError::Exists(all));
        }
    } else if !args.force {
        let existing: Vec<PathBuf> = files
            .iter()
            .filter(|f| f.path.symlink_metadata().is_ok())
            .map(|f| f.path.clone())
            .collect();
        if !existing.is_empty() {
            return Err(DevCertsError::Exists(existing));
        }
    }
    std::fs::create_dir_all(&args.out).map_err(|source| DevCertsError::Write {
        path: args.out.clone(),
        source,
    })?;
    for f in &files {
        write_file(f)?;
    }
    let dir = std::fs::canonicalize(&args.out).unwrap_or_else(|_| args.out.clone());
    let files = files
        .into_iter()
        .map(|f| PemFile {
            path: dir.join(f.path.file_name().map(Path::new).unwrap_or(&f.path)),
            ..f
        })
        .collect();
    Ok(Written { dir, files })
}

#[cfg(test)]
mod tests;
