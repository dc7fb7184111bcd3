//! `dev-certs` output checked the way a peer checks it: with rustls' own WebPKI verifiers,
//! as a server certificate for each name a replica is dialed by and as a client
//! certificate, and the files' permissions and overwrite rules.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use super::*;

fn args(out: &Path) -> DevCertsArgs {
    DevCertsArgs {
        out: out.to_path_buf(),
        replicas: 2,
        hosts: vec!["db.example.org".into(), "10.1.2.3".into()],
        force: false,
    }
}

fn cert(dir: &Path, name: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(dir.join(name)).expect("a PEM certificate")
}

fn roots(dir: &Path) -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    roots
        .add(cert(dir, "ca.crt"))
        .expect("the CA is a usable root");
    Arc::new(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Whether `file` verifies as a server certificate for `name` under `ca_dir`'s CA.
fn serves(ca_dir: &Path, dir: &Path, file: &str, name: &str) -> Result<(), rustls::Error> {
    let verifier = WebPkiServerVerifier::builder_with_provider(roots(ca_dir), provider())
        .build()
        .expect("a server verifier");
    let name = ServerName::try_from(name.to_string()).expect("a server name");
    verifier
        .verify_server_cert(&cert(dir, file), &[], &name, &[], UnixTime::now())
        .map(|_| ())
}

/// Whether `file` verifies as a client certificate under `dir`'s CA.
fn authenticates(dir: &Path, file: &str) -> Result<(), rustls::Error> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(dir), provider())
        .build()
        .expect("a client verifier");
    verifier
        .verify_client_cert(&cert(dir, file), &[], UnixTime::now())
        .map(|_| ())
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("a temporary directory")
}

#[test]
fn replica_certificates_are_valid_for_every_name_a_replica_is_dialed_by() {
    let tmp = tempdir();
    let dir = tmp.path().join("certs");
    run(&args(&dir)).expect("dev-certs");
    for id in 1..=2 {
        let file = format!("replica-{id}.crt");
        let names = [
            format!("replica-{id}"),
            "localhost".into(),
            format!("dispatcher-{id}"),
            format!("dispatcher-{id}.dispatcher"),
            "db.example.org".into(),
            "127.0.0.1".into(),
            "::1".into(),
            "10.1.2.3".into(),
        ];
        for name in names {
            assert_eq!(
                serves(&dir, &dir, &file, &name),
                Ok(()),
                "{file} for {name}"
            );
        }
        // Replicas dial each other with the same certificate.
        assert_eq!(authenticates(&dir, &file), Ok(()), "{file} as a client");
    }
    // A replica's certificate names only its own id: that is how a peer is recognised.
    assert!(serves(&dir, &dir, "replica-1.crt", "replica-2").is_err());
    assert!(serves(&dir, &dir, "replica-1.crt", "replica-3").is_err());
    assert!(
        !dir.join("replica-3.crt").exists(),
        "--replicas 2 makes two"
    );
}

#[test]
fn taskmanager_and_client_certificates_authenticate_clients_only() {
    let tmp = tempdir();
    run(&args(tmp.path())).expect("dev-certs");
    let dir = tmp.path();
    assert_eq!(authenticates(dir, "taskmanager.crt"), Ok(()));
    assert_eq!(authenticates(dir, "client.crt"), Ok(()));
    // Without serverAuth, a stolen client certificate cannot impersonate a replica.
    assert!(serves(dir, dir, "taskmanager.crt", "taskmanager").is_err());
    assert!(serves(dir, dir, "client.crt", "localhost").is_err());
}

#[test]
fn certificates_of_another_dev_ca_are_not_trusted() {
    let (a, b) = (tempdir(), tempdir());
    run(&args(a.path())).expect("dev-certs a");
    run(&args(b.path())).expect("dev-certs b");
    let refused = serves(a.path(), b.path(), "replica-1.crt", "replica-1");
    assert!(
        matches!(
            refused,
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer
            ))
        ),
        "{refused:?}"
    );
}

#[test]
fn keys_and_the_token_are_private_to_their_owner() {
    let tmp = tempdir();
    let written = run(&args(tmp.path())).expect("dev-certs");
    assert_eq!(written.files.len(), 2 + 2 * 2 + 2 + 2 + 1, "{written:?}");
    for f in &written.files {
        let mode = std::fs::metadata(&f.path)
            .expect("written")
            .permissions()
            .mode()
            & 0o777;
        let name = f.path.display().to_string();
        if name.ends_with(".key") || name.ends_with(".token") {
            assert_eq!(mode, 0o600, "{name}");
        } else {
            assert_eq!(mode, 0o644, "{name}");
        }
    }
    assert_eq!(
        written.ca(),
        tmp.path().canonicalize().expect("dir").join("ca.crt")
    );
}

#[test]
fn the_admin_token_is_256_random_bits_that_a_client_can_read_back() {
    let tmp = tempdir();
    let written = run(&args(tmp.path())).expect("dev-certs");
    let raw = std::fs::read_to_string(written.admin_token()).expect("token file");
    let secret = raw.trim();
    assert_eq!(secret.len(), 64, "32 bytes, hex");
    assert!(secret.bytes().all(|b| b.is_ascii_hexdigit()), "{secret}");
    let token = crate::client::Token::from_file(&written.admin_token()).expect("a token");
    assert_eq!(token.secret(), secret);
    assert_ne!(new_secret(), new_secret());
}

#[test]
fn existing_files_are_kept_unless_forced() {
    let tmp = tempdir();
    let mut a = args(tmp.path());
    run(&a).expect("first run");
    let ca = std::fs::read(tmp.path().join("ca.crt")).expect("ca.crt");
    let token = std::fs::read(tmp.path().join("admin.token")).expect("admin.token");
    match run(&a) {
        Err(DevCertsError::Exists(files)) => {
            assert_eq!(files.len(), 11, "{files:?}");
            let message = DevCertsError::Exists(files).to_string();
            assert!(
                message.contains("ca.crt") && message.contains("--force"),
                "{message}"
            );
        }
        other => panic!("a second run overwrote: {other:?}"),
    }
    assert_eq!(
        std::fs::read(tmp.path().join("ca.crt")).expect("ca.crt"),
        ca
    );
    assert_eq!(
        std::fs::read(tmp.path().join("admin.token")).expect("admin.token"),
        token
    );

    // --force replaces everything, and a key whose mode was widened is private again.
    let key = tmp.path().join("ca.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    a.force = true;
    run(&a).expect("forced run");
    assert_ne!(
        std::fs::read(tmp.path().join("ca.crt")).expect("ca.crt"),
        ca
    );
    let mode = std::fs::metadata(&key).expect("key").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn a_second_run_with_more_replicas_signs_only_the_new_one_with_the_same_ca() {
    let tmp = tempdir();
    let mut a = args(tmp.path());
    run(&a).expect("first run");
    let ca = std::fs::read(tmp.path().join("ca.crt")).expect("ca.crt");
    let token = std::fs::read(tmp.path().join("admin.token")).expect("admin.token");
    let next = a.replicas + 1;
    a.replicas = next;
    let written = run(&a).expect("a run that adds a replica");
    let names: Vec<String> = written
        .files
        .iter()
        .map(|f| {
            f.path
                .file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(
        names,
        vec![format!("replica-{next}.crt"), format!("replica-{next}.key")]
    );
    assert_eq!(std::fs::read(tmp.path().join("ca.crt")).expect("ca"), ca);
    assert_eq!(
        std::fs::read(tmp.path().join("admin.token")).expect("token"),
        token,
        "the admin token the cluster knows is kept"
    );
    serves(
        tmp.path(),
        tmp.path(),
        &format!("replica-{next}.crt"),
        &format!("replica-{next}"),
    )
    .expect("the new replica's certificate chains to the existing CA");
}

#[test]
fn a_bad_host_is_refused_before_anything_is_written() {
    let tmp = tempdir();
    let dir = tmp.path().join("certs");
    for bad in ["two words", "", "a..b", "under_score"] {
        let mut a = args(&dir);
        a.hosts = vec![bad.to_string()];
        match run(&a) {
            Err(DevCertsError::Host { name }) => assert_eq!(name, bad),
            other => panic!("--host {bad:?}: {other:?}"),
        }
        assert!(!dir.exists(), "nothing written for --host {bad:?}");
    }
}
