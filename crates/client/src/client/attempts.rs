//! How one call spreads its tries over the endpoints, as pure decisions: which status is
//! worth another try, which replica the next try goes to, what a failed try means, and
//! when to stop early because nothing listens anywhere. Kept apart from the network so
//! that the rules are tested without one.

use std::collections::HashMap;
use std::time::Duration;

use tonic::{Code, Status};

use super::{seconds, EndpointFailure, LEADER_ADDRESS_KEY, LEADER_TERM_KEY};

/// Whether another try (on another replica, or after an election) may succeed.
pub(super) fn retryable(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::Cancelled
            | Code::Aborted
    )
}

/// The leader a replica names in a reply's metadata, if it names one.
pub(super) fn leader_hint(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    metadata
        .get(LEADER_ADDRESS_KEY)
        .and_then(|v| v.to_str().ok())
        .filter(|h| !h.is_empty())
        .map(str::to_string)
}

/// The term a replica gives with its leader hint, if it gives one (older replicas do not).
pub(super) fn hint_term(metadata: &tonic::metadata::MetadataMap) -> Option<u64> {
    metadata
        .get(LEADER_TERM_KEY)
        .and_then(|v| v.to_str().ok())
        .and_then(|t| t.parse().ok())
}

/// Which replica the next try goes to: the last leader seen or hinted, else the
/// endpoints in turn. Kept apart from the network so that the rules can be tested.
#[derive(Debug, Default)]
pub(super) struct EndpointChoice {
    pub(super) preferred: Option<String>,
    pub(super) rotation: usize,
    /// The newest term a followed hint carried.
    pub(super) term: u64,
}

impl EndpointChoice {
    /// The address to try next; `None` only without endpoints.
    pub(super) fn pick(&mut self, endpoints: &[String]) -> Option<String> {
        if let Some(p) = &self.preferred {
            return Some(p.clone());
        }
        let addr = endpoints
            .get(self.rotation % endpoints.len().max(1))?
            .clone();
        self.rotation += 1;
        Some(addr)
    }

    /// Whether a hint given in `term` may be followed, and if so remembers the term. A
    /// hint older than one already followed comes from a replica that has not heard of
    /// the election since: the leader it names was deposed. A hint without a term (an
    /// older replica) is followed.
    pub(super) fn current(&mut self, term: Option<u64>) -> bool {
        match term {
            Some(t) if t < self.term => false,
            Some(t) => {
                self.term = t;
                true
            }
            None => true,
        }
    }

    /// Learns from a try at `addr`: its answer (with the leader it was forwarded to and
    /// that hint's term, if it says) or the retryable error it failed with.
    pub(super) fn learn(
        &mut self,
        addr: &str,
        outcome: Result<Option<(&str, Option<u64>)>, &Status>,
    ) {
        self.preferred = match outcome {
            // A forwarded answer names the leader: go there directly next time.
            Ok(Some((leader, term))) if self.current(term) => Some(leader.to_string()),
            Ok(_) => Some(addr.to_string()),
            // A hint naming the replica that just failed would pin us to it.
            Err(status) => leader_hint(status.metadata())
                .filter(|h| h != addr)
                .filter(|_| self.current(hint_term(status.metadata()))),
        };
    }
}

/// One failed try, as the decision to go on sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct TryFailure {
    /// The cause in a few words, for the final error.
    pub(super) cause: String,
    /// Nothing we can talk to listens there: the TCP connection was refused or had no
    /// route, or the TLS handshake failed (a certificate that does not chain to our CA
    /// will not start to during an election). Anything else (a replica's UNAVAILABLE, a
    /// timeout, a dropped stream) may be an election.
    pub(super) not_listening: bool,
}

/// What usually causes a TLS failure, from rustls' own error.
fn tls_hint(e: &rustls::Error) -> &'static str {
    use rustls::{AlertDescription as Alert, CertificateError as Cert, Error};
    match e {
        Error::InvalidCertificate(Cert::UnknownIssuer | Cert::BadSignature) => CA_HINT,
        Error::InvalidCertificate(Cert::NotValidForName | Cert::NotValidForNameContext { .. }) => {
            " (the address dialed is not among the names of the replica's certificate)"
        }
        Error::InvalidCertificate(Cert::Expired | Cert::ExpiredContext { .. }) => {
            " (the replica's certificate has expired)"
        }
        Error::AlertReceived(
            Alert::CertificateRequired
            | Alert::BadCertificate
            | Alert::UnknownCA
            | Alert::CertificateUnknown
            | Alert::AccessDenied,
        ) => CLIENT_CERT_HINT,
        Error::InvalidMessage(_) => NOT_TLS_HINT,
        _ => "",
    }
}

const CA_HINT: &str = " (is --ca the CA that signed the replicas' certificates?)";
const CLIENT_CERT_HINT: &str =
    " (the replica wants a client certificate of its CA: --cert and --key)";
const NOT_TLS_HINT: &str = " (does the replica serve TLS? one without --tls-cert speaks plain \
                            gRPC: drop --ca)";

/// A TLS failure that reached us only as text: after the handshake (TLS 1.3 checks a
/// client certificate then), HTTP/2 keeps an I/O error's kind and message but drops the
/// rustls error inside it.
fn tls_text_hint(message: &str) -> &'static str {
    let alert = |names: &[&str]| names.iter().any(|n| message.contains(n));
    if alert(&[
        "CertificateRequired",
        "BadCertificate",
        "UnknownCA",
        "CertificateUnknown",
        "AccessDenied",
    ]) {
        CLIENT_CERT_HINT
    } else if alert(&["UnknownIssuer", "BadSignature"]) {
        CA_HINT
    } else {
        ""
    }
}

/// The cause of a transport failure, read from the I/O error at the bottom of its chain
/// (tonic's own message is only `tcp connect error` or `transport error`); `None` when
/// the chain holds no I/O error.
pub(super) fn io_cause(err: &(dyn std::error::Error + 'static)) -> Option<TryFailure> {
    use std::io::ErrorKind;
    let mut source = Some(err);
    while let Some(e) = source {
        // tokio-rustls reports a failed handshake as an I/O error around rustls' own,
        // which `source()` skips over: look inside.
        let tls = e.downcast_ref::<rustls::Error>().or_else(|| {
            e.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(tls) = tls {
            return Some(TryFailure {
                cause: format!("TLS handshake failed: {tls}{}", tls_hint(tls)),
                not_listening: true,
            });
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            let (cause, not_listening) = match io.kind() {
                ErrorKind::ConnectionRefused => ("connection refused".to_string(), true),
                ErrorKind::HostUnreachable => ("no route to host".to_string(), true),
                ErrorKind::NetworkUnreachable => ("network unreachable".to_string(), true),
                // A host that swallows SYNs may be partitioned, not gone.
                ErrorKind::TimedOut => ("connect timed out".to_string(), false),
                // What rustls' failures become on the way up; a plain TCP stream does
                // not report invalid data. Like a refusal, retrying will not mend it.
                ErrorKind::InvalidData => {
                    let message = io.to_string();
                    let hint = tls_text_hint(&message);
                    (format!("TLS failed: {message}{hint}"), true)
                }
                _ => (io.to_string(), false),
            };
            return Some(TryFailure {
                cause,
                not_listening,
            });
        }
        source = e.source();
    }
    None
}

/// How a retryable failure counts: the I/O cause if the connection failed, the try's
/// deadline if it ran out, else the replica's own message.
pub(super) fn classify(status: &Status, per_try: Duration) -> TryFailure {
    if let Some(f) = io_cause(status) {
        return f;
    }
    // tonic enforces the request's `grpc-timeout` itself, racing the try's own timer;
    // either way the replica did not answer in time.
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.is::<tonic::TimeoutExpired>() {
            return TryFailure {
                cause: no_answer_within(per_try),
                not_listening: false,
            };
        }
        source = e.source();
    }
    TryFailure {
        cause: if status.message().is_empty() {
            status.code().description().to_string()
        } else {
            status.message().to_string()
        },
        not_listening: false,
    }
}

/// Whether a try failed because the replica closed a connection it had accepted (a reset,
/// a broken pipe, an early end): what a TLS port does to a plain-text client, and also
/// what a replica that stops does, so it is a hint, not a verdict.
pub(super) fn connection_dropped(err: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind;
    let mut source = Some(err);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                ErrorKind::BrokenPipe
                    | ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
                    | ErrorKind::UnexpectedEof
            );
        }
        source = e.source();
    }
    false
}

/// Appended to a dropped connection's cause when the client does not use TLS.
pub(super) const PLAIN_TEXT_HINT: &str =
    " (if the cluster serves TLS, connect with --ca FILE or DISPATCHER_CA)";

pub(super) fn no_answer_within(per_try: Duration) -> String {
    format!("no answer within {}", seconds(per_try))
}

/// Describes a transport error for a message: its I/O cause if it has one.
pub(crate) fn transport_cause(err: &(dyn std::error::Error + 'static)) -> String {
    io_cause(err).map_or_else(|| err.to_string(), |f| f.cause)
}

/// What one call learned from its tries, and whether going on can help. Pure: the caller
/// passes the time since the call started, so the rule is tested without a network.
///
/// The rule: stop early only if, for `window`, every try found nothing listening and
/// every endpoint was tried at least twice in that time. One replica answering (even
/// UNAVAILABLE: an election) or timing out starts the count again, so a call keeps
/// trying until its deadline while any replica may be alive.
#[derive(Debug, Default)]
pub(super) struct CallHistory {
    pub(super) attempts: usize,
    /// Each address tried, in the order first tried, with the cause of its last failure.
    pub(super) causes: Vec<EndpointFailure>,
    /// The current run of tries that found nothing listening: when its first failed,
    /// and how many tries each address had in it.
    pub(super) unreachable: Option<(Duration, HashMap<String, usize>)>,
}

/// How many tries at every endpoint, all refused, make "nothing is listening".
pub(super) const UNREACHABLE_ROUNDS: usize = 2;

impl CallHistory {
    /// A try at `addr` begins.
    pub(super) fn started(&mut self, addr: &str) {
        self.attempts += 1;
        if !self.causes.iter().any(|c| c.address == addr) {
            // Replaced when the try fails; stays if the deadline cuts it short.
            self.causes.push(EndpointFailure {
                address: addr.to_string(),
                cause: "no answer before the deadline".to_string(),
            });
        }
    }

    /// The try at `addr` failed `at` (time since the call started).
    pub(super) fn failed(&mut self, at: Duration, addr: &str, failure: TryFailure) {
        match self.causes.iter_mut().find(|c| c.address == addr) {
            Some(c) => c.cause = failure.cause,
            None => self.causes.push(EndpointFailure {
                address: addr.to_string(),
                cause: failure.cause,
            }),
        }
        if failure.not_listening {
            let (_, tries) = self.unreachable.get_or_insert_with(|| (at, HashMap::new()));
            *tries.entry(addr.to_string()).or_default() += 1;
        } else {
            self.unreachable = None;
        }
    }

    /// Whether nothing listens at any of `endpoints`, judged `at` (time since the call
    /// started) over `window`.
    pub(super) fn nothing_listening(
        &self,
        at: Duration,
        endpoints: &[String],
        window: Duration,
    ) -> bool {
        let Some((since, tries)) = &self.unreachable else {
            return false;
        };
        !endpoints.is_empty()
            && at.saturating_sub(*since) >= window
            && endpoints
                .iter()
                .all(|e| tries.get(e).copied().unwrap_or(0) >= UNREACHABLE_ROUNDS)
    }
}
