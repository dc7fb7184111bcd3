//! Tokens stay secret, flags are checked, and a real TLS connection: an in-process tonic
//! server with `dispatchctl dev-certs` certificates, seen through the client library.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Server, ServerTlsConfig};
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::*;
use crate::cli::dev_certs::{self, DevCertsArgs};
use crate::client::{Client, ClientConfig, ClientError, GaveUp};

const SECRET: &str = "3f9a0c1d2e3f40516273849a5b6c7d8e9f00112233445566778899aabbccddee";

/// A command with nothing but the connection flags, as both binaries flatten them.
#[derive(Debug, Parser)]
struct Flags {
    #[command(flatten)]
    connect: ConnectArgs,
}

/// Parses the flags blind to the environment: a developer who exported `DISPATCHER_CA` as
/// the README says must not change what these tests see.
fn flags(args: &[&str]) -> Result<ConnectArgs, clap::Error> {
    use clap::{CommandFactory, FromArgMatches};
    let mut argv = vec!["test"];
    argv.extend_from_slice(args);
    let matches = Flags::command()
        .mut_args(|a| a.env(None::<&str>))
        .try_get_matches_from(argv)?;
    Flags::from_arg_matches(&matches).map(|f| f.connect)
}

#[test]
fn every_connection_flag_has_its_environment_variable() {
    use clap::CommandFactory;
    let cmd = Flags::command();
    let env: Vec<(String, String)> = cmd
        .get_arguments()
        .filter_map(|a| {
            let long = a.get_long()?.to_string();
            let var = a.get_env()?.to_str()?.to_string();
            Some((long, var))
        })
        .collect();
    let want = [
        ("ca", "DISPATCHER_CA"),
        ("cert", "DISPATCHER_CERT"),
        ("key", "DISPATCHER_KEY"),
        ("token", "DISPATCHER_TOKEN"),
        ("token-file", "DISPATCHER_TOKEN_FILE"),
    ]
    .map(|(l, v)| (l.to_string(), v.to_string()));
    assert_eq!(env, want);
    let token = cmd
        .get_arguments()
        .find(|a| a.get_long() == Some("token"))
        .expect("--token");
    assert!(
        token.is_hide_env_values_set(),
        "--help must not print DISPATCHER_TOKEN's value"
    );
}

#[test]
fn the_taskmanager_takes_the_same_connection_flags() {
    use clap::{CommandFactory, FromArgMatches};
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("tm.token");
    std::fs::write(&file, format!("{SECRET}\n")).expect("write");
    let matches = crate::taskmanager::Args::command()
        .mut_args(|a| a.env(None::<&str>))
        .try_get_matches_from([
            "taskmanager",
            "--id",
            "tm-1",
            "--dispatchers",
            "127.0.0.1:7001",
            "--token-file",
            &file.display().to_string(),
        ])
        .expect("taskmanager flags");
    let args = crate::taskmanager::Args::from_arg_matches(&matches).expect("args");
    let config = args.clone().into_config().expect("config");
    assert_eq!(config.token.as_ref().map(Token::secret), Some(SECRET));
    assert!(config.tls.is_none());
    assert!(!format!("{config:?}").contains(SECRET), "{config:?}");

    let mut bad = args;
    bad.connect.ca = Some(tmp.path().join("missing-ca.crt"));
    let message = bad.into_config().expect_err("a missing CA");
    assert!(message.contains("missing-ca.crt"), "{message}");
}

fn parsed(args: &[&str]) -> ConnectArgs {
    match flags(args) {
        Ok(c) => c,
        Err(e) => panic!("{args:?} refused: {e}"),
    }
}

#[tokio::test]
async fn a_token_never_shows_in_debug_output() {
    let token = Token::new(SECRET).expect("a token");
    let config = ClientConfig::new(vec!["a:1".into()]).with_token(token.clone());
    let client = Client::new(config.clone()).expect("a client");
    let args = ConnectArgs {
        token: Some(token.clone()),
        ..Default::default()
    };
    let shown = [
        format!("{token:?}"),
        format!("{config:?}"),
        format!("{config:#?}"),
        format!("{args:?}"),
        format!("{:?}", BearerAuth::new(Some(token.clone()))),
        format!("{:?}", token.header()),
        format!("{:?}", client.config()),
    ];
    for s in &shown {
        assert!(!s.contains(SECRET) && !s.contains(&SECRET[..16]), "{s}");
    }
    assert!(shown[0].contains("<redacted>"), "{}", shown[0]);
    assert!(token.header().is_sensitive());
    assert_eq!(token.secret(), SECRET);
    assert_eq!(
        token.header().to_str().ok(),
        Some(format!("Bearer {SECRET}").as_str())
    );
}

#[test]
fn a_token_is_trimmed_and_must_be_visible_ascii() {
    assert_eq!(
        Token::new(&format!("  {SECRET}\n"))
            .expect("trimmed")
            .secret(),
        SECRET
    );
    for bad in ["", "   \n", "two words", "tab\there", "é-accent"] {
        let e = match Token::new(bad) {
            Ok(_) => panic!("{bad:?} accepted"),
            Err(e) => e.to_string(),
        };
        assert!(e.starts_with("token: "), "{e}");
        if !bad.trim().is_empty() {
            assert!(!e.contains(bad.trim()), "the error quotes the secret: {e}");
        }
    }
}

#[test]
fn a_bad_token_flag_is_refused_without_echoing_it() {
    let e = match flags(&["--token", "secret with spaces"]) {
        Ok(_) => panic!("accepted"),
        Err(e) => e,
    };
    assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation);
    let message = e.to_string();
    assert!(message.contains("--token"), "{message}");
    assert!(!message.contains("secret with spaces"), "{message}");
}

#[test]
fn the_token_comes_from_the_flag_or_a_trimmed_file_but_not_both() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("admin.token");
    std::fs::write(&file, format!("\n{SECRET}\n\n")).expect("write");
    let file_arg = file.display().to_string();

    let from_flag = parsed(&["--token", SECRET]).token().expect("token");
    assert_eq!(
        from_flag.map(|t| t.secret().to_string()).as_deref(),
        Some(SECRET)
    );
    let from_file = parsed(&["--token-file", &file_arg]).token().expect("token");
    assert_eq!(
        from_file.map(|t| t.secret().to_string()).as_deref(),
        Some(SECRET)
    );
    assert_eq!(parsed(&[]).token().expect("no token"), None);

    let both = parsed(&["--token", SECRET, "--token-file", &file_arg]).token();
    let message = both.expect_err("both refused").to_string();
    assert!(
        message.contains("--token-file") && message.contains("use one"),
        "{message}"
    );

    let missing = tmp.path().join("nope.token");
    let message = parsed(&["--token-file", &missing.display().to_string()])
        .token()
        .expect_err("missing file")
        .to_string();
    assert!(
        message.contains(&missing.display().to_string()),
        "{message}"
    );

    std::fs::write(&file, "\n \n").expect("write");
    let message = parsed(&["--token-file", &file_arg])
        .token()
        .expect_err("empty file")
        .to_string();
    assert_eq!(message, format!("token file {file_arg}: is empty"));
}

/// Writes `dispatchctl dev-certs` output into a fresh directory.
fn dev_certs(dir: &Path) -> PathBuf {
    let args = DevCertsArgs {
        out: dir.to_path_buf(),
        replicas: 1,
        hosts: vec![],
        force: false,
    };
    dev_certs::run(&args).expect("dev-certs").dir
}

#[test]
fn certificate_flags_go_together_and_bad_files_are_named() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = dev_certs(tmp.path());
    let path = |name: &str| dir.join(name).display().to_string();
    let (ca, cert, key) = (path("ca.crt"), path("client.crt"), path("client.key"));

    assert_eq!(
        parsed(&[]).tls().expect("no TLS").map(|t| t.has_identity()),
        None
    );
    let tls = parsed(&["--ca", &ca]).tls().expect("TLS");
    assert_eq!(tls.map(|t| t.has_identity()), Some(false));
    let tls = parsed(&["--ca", &ca, "--cert", &cert, "--key", &key]).tls();
    assert_eq!(tls.expect("TLS").map(|t| t.has_identity()), Some(true));

    for (args, needle) in [
        (
            vec!["--ca", &ca, "--cert", &cert],
            "--cert (DISPATCHER_CERT) needs --key",
        ),
        (
            vec!["--ca", &ca, "--key", &key],
            "--key (DISPATCHER_KEY) needs --cert",
        ),
        (
            vec!["--cert", &cert, "--key", &key],
            "--cert and --key need --ca",
        ),
    ] {
        let message = parsed(&args).tls().expect_err("refused").to_string();
        assert!(message.contains(needle), "{args:?}: {message}");
    }

    // Files that are missing, or hold something else, are named with what they should hold.
    let missing = path("missing.crt");
    let message = parsed(&["--ca", &missing])
        .tls()
        .expect_err("missing")
        .to_string();
    assert!(
        message.starts_with(&format!("CA certificate file {missing}: cannot read it")),
        "{message}"
    );
    let message = parsed(&["--ca", &key])
        .tls()
        .expect_err("a key")
        .to_string();
    assert_eq!(
        message,
        format!("CA certificate file {key}: holds no PEM certificate")
    );
    let message = parsed(&["--ca", &ca, "--cert", &cert, "--key", &cert])
        .tls()
        .expect_err("a certificate as key")
        .to_string();
    assert!(
        message.starts_with(&format!(
            "client key file {cert}: no usable PEM private key"
        )),
        "{message}"
    );
    // A private key's Debug never shows its bytes.
    let tls = TlsConfig::from_files(
        dir.join("ca.crt").as_path(),
        Some((
            dir.join("client.crt").as_path(),
            dir.join("client.key").as_path(),
        )),
    )
    .expect("TLS");
    let key_pem = std::fs::read_to_string(dir.join("client.key")).expect("key");
    let body = key_pem.lines().nth(1).expect("a PEM body line");
    assert!(!format!("{tls:?}").contains(body), "{tls:?}");
}

#[test]
fn addresses_are_dialed_with_the_scheme_the_tls_settings_ask_for() {
    assert_eq!(endpoint_uri("h:1", true).as_deref(), Ok("https://h:1"));
    assert_eq!(endpoint_uri("h:1", false).as_deref(), Ok("http://h:1"));
    assert_eq!(
        endpoint_uri("https://h:1", true).as_deref(),
        Ok("https://h:1")
    );
    assert_eq!(
        endpoint_uri("http://h:1", false).as_deref(),
        Ok("http://h:1")
    );
    assert!(
        endpoint_uri("http://h:1", true).is_err(),
        "plain text with TLS settings"
    );
    let e = endpoint_uri("https://h:1", false).expect_err("TLS without a CA");
    assert!(e.contains("--ca"), "{e}");
}

#[test]
fn the_interceptor_adds_the_token_unless_the_request_has_one() {
    let token = Token::new(SECRET).expect("token");
    let mut auth = BearerAuth::new(Some(token));
    let req = auth.call(Request::new(())).expect("intercepted");
    let sent = req
        .metadata()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    assert_eq!(sent, Some(format!("Bearer {SECRET}").as_str()));

    let mut own = Request::new(());
    own.metadata_mut()
        .insert(AUTHORIZATION, "Bearer other".parse().expect("header"));
    let req = auth.call(own).expect("intercepted");
    let sent = req
        .metadata()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    assert_eq!(sent, Some("Bearer other"));

    let req = BearerAuth::new(None)
        .call(Request::new(()))
        .expect("intercepted");
    assert!(req.metadata().get(AUTHORIZATION).is_none());
}

/// An in-process TLS server (the health service, with `replica-1`'s certificate) that
/// records the `authorization` header of every call and, if `token` is set, refuses calls
/// without it as a replica would.
struct TlsServer {
    port: u16,
    seen: Arc<Mutex<Vec<Option<String>>>>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl TlsServer {
    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn seen(&self) -> Vec<Option<String>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

async fn tls_server(
    dir: &Path,
    token: Option<&str>,
    client_certificate_required: bool,
) -> TlsServer {
    let read = |name: &str| std::fs::read(dir.join(name)).expect("dev-certs file");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("local addr").port();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let expected = token.map(|t| format!("Bearer {t}"));
    let check = move |req: Request<()>| {
        let header = req
            .metadata()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        record
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(header.clone());
        match &expected {
            Some(want) if header.as_ref() != Some(want) => Err(Status::unauthenticated(
                "Check needs a token with role read, submit or admin",
            )),
            _ => Ok(req),
        }
    };
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            read("replica-1.crt"),
            read("replica-1.key"),
        ))
        .client_ca_root(Certificate::from_pem(read("ca.crt")))
        .client_auth_optional(!client_certificate_required);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = Server::builder()
        .tls_config(tls)
        .expect("server TLS config")
        .add_service(InterceptedService::new(health, check))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
            let _ = stopped.await;
        });
    tokio::spawn(server);
    TlsServer {
        port,
        seen,
        _stop: stop,
    }
}

fn quick(endpoints: Vec<String>) -> ClientConfig {
    let mut config = ClientConfig::new(endpoints);
    config.timeout = Duration::from_secs(10);
    config.per_try_timeout = Duration::from_secs(2);
    config.unreachable_timeout = Duration::from_millis(300);
    config.min_backoff = Duration::from_millis(5);
    config.max_backoff = Duration::from_millis(50);
    config
}

async fn check(client: &Client) -> Result<i32, ClientError> {
    client
        .call(|conn, _| async move {
            HealthClient::new(conn)
                .check(HealthCheckRequest::default())
                .await
                .map(|r| r.into_inner().status)
        })
        .await
}

async fn check_at(client: &Client, addr: &str) -> Result<i32, Status> {
    let conn = client
        .connection(addr)
        .map_err(|e| Status::internal(e.to_string()))?;
    HealthClient::new(conn)
        .check(HealthCheckRequest::default())
        .await
        .map(|r| r.into_inner().status)
}

const SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;

#[tokio::test]
async fn over_tls_with_the_ca_every_request_carries_the_token() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = dev_certs(tmp.path());
    let server = tls_server(&dir, None, false).await;
    let args = parsed(&[
        "--ca",
        &dir.join("ca.crt").display().to_string(),
        "--token-file",
        &dir.join("admin.token").display().to_string(),
    ]);
    let mut config = quick(vec![server.addr()]);
    args.configure(&mut config).expect("connection flags");
    let secret = config
        .token
        .as_ref()
        .map(|t| t.secret().to_string())
        .expect("a token");
    let client = Client::new(config).expect("client");

    assert_eq!(check(&client).await.expect("a TLS call"), SERVING);
    assert_eq!(check(&client).await.expect("a second call"), SERVING);
    // A leader hint names host:port; it is dialed over TLS too, and checked against the
    // certificate's names (replica-1's names localhost).
    let hinted = format!("localhost:{}", server.port);
    assert_eq!(
        check_at(&client, &hinted).await.expect("a hinted address"),
        SERVING
    );
    let bearer = Some(format!("Bearer {secret}"));
    assert_eq!(server.seen(), vec![bearer.clone(), bearer.clone(), bearer]);
}

#[tokio::test]
async fn a_missing_or_unknown_token_is_refused_once_with_the_replicas_message() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = dev_certs(tmp.path());
    let server = tls_server(&dir, Some(SECRET), false).await;
    let tls = TlsConfig::from_ca_file(&dir.join("ca.crt")).expect("CA");
    let with = |token: Option<&str>| {
        let mut config = quick(vec![server.addr()]).with_tls(tls.clone());
        config.token = token.map(|t| Token::new(t).expect("token"));
        Client::new(config).expect("client")
    };
    for (token, calls) in [(None, 1), (Some("not-the-secret"), 2)] {
        let started = Instant::now();
        match check(&with(token)).await {
            Err(e @ ClientError::Rejected(_)) => {
                assert_eq!(e.code(), Some(Code::Unauthenticated));
                assert!(e.is_auth());
                assert_eq!(
                    e.to_string(),
                    "Check needs a token with role read, submit or admin"
                );
            }
            other => panic!("token {token:?}: {other:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "not retried until the deadline"
        );
        assert_eq!(
            server.seen().len(),
            calls,
            "one try per call: {:?}",
            server.seen()
        );
    }
    assert_eq!(
        check(&with(Some(SECRET))).await.expect("the right token"),
        SERVING
    );
}

#[tokio::test]
async fn a_replica_of_another_ca_is_refused_quickly_and_the_error_says_why() {
    let (ours, theirs) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let ours = dev_certs(ours.path());
    let theirs = dev_certs(theirs.path());
    let server = tls_server(&theirs, None, false).await;
    let tls = TlsConfig::from_ca_file(&ours.join("ca.crt")).expect("CA");
    let client = Client::new(quick(vec![server.addr()]).with_tls(tls)).expect("client");
    let started = Instant::now();
    let result = check(&client).await;
    let waited = started.elapsed();
    match &result {
        Err(e @ ClientError::Unavailable { gave_up, .. }) => {
            assert_eq!(*gave_up, GaveUp::NothingListening, "{e}");
            let message = e.to_string();
            assert!(message.contains("TLS handshake failed"), "{message}");
            assert!(message.contains("UnknownIssuer"), "{message}");
            assert!(message.contains("--ca"), "{message}");
        }
        other => panic!("expected a TLS failure, got {other:?}"),
    }
    assert!(
        waited < Duration::from_secs(5),
        "gave up after {waited:?}, not at the deadline"
    );
    assert!(server.seen().is_empty(), "no call got through");
}

#[tokio::test]
async fn a_plain_text_client_cannot_talk_to_a_tls_port() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = dev_certs(tmp.path());
    let server = tls_server(&dir, None, false).await;
    let mut config = quick(vec![server.addr()]);
    config.timeout = Duration::from_secs(3);
    let client = Client::new(config).expect("client");
    let result = check(&client).await;
    match &result {
        Err(e @ ClientError::Unavailable { .. }) => {
            let message = e.to_string();
            assert!(message.contains(&server.addr()), "{message}");
            assert!(
                message.contains("if the cluster serves TLS, connect with --ca"),
                "{message}"
            );
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    assert!(server.seen().is_empty(), "no call got through");
}

#[tokio::test]
async fn a_client_certificate_is_presented_when_the_replica_requires_one() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = dev_certs(tmp.path());
    let server = tls_server(&dir, None, true).await;
    let ca = dir.join("ca.crt");
    let with_cert = TlsConfig::from_files(
        &ca,
        Some((
            dir.join("client.crt").as_path(),
            dir.join("client.key").as_path(),
        )),
    )
    .expect("TLS with a client certificate");
    let client = Client::new(quick(vec![server.addr()]).with_tls(with_cert)).expect("client");
    assert_eq!(
        check(&client).await.expect("with a client certificate"),
        SERVING
    );

    let without = TlsConfig::from_ca_file(&ca).expect("CA");
    let client = Client::new(quick(vec![server.addr()]).with_tls(without)).expect("client");
    let started = Instant::now();
    match check(&client).await {
        Err(e @ ClientError::Unavailable { .. }) => {
            let message = e.to_string();
            assert!(message.contains("CertificateRequired"), "{message}");
            assert!(message.contains("--cert and --key"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "not retried until the deadline"
    );
}
