//! Forwarding a write from a follower to the leader: one lazily connected channel per
//! leader address, reused. A forwarded request carries `x-dispatcher-forwarded`, and a
//! replica never forwards such a request again, so a stale leader hint cannot make two
//! replicas bounce a request between them.
//!
//! Also what a failed forward means: a status the leader sent is its answer and passes
//! through unchanged; a status tonic made here (the connection refused or reset, its
//! client-side timeout) is a failure of the forward, which the edge answers as
//! UNAVAILABLE with the leader hint. This module tells the two apart and never decides
//! what to do about either.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_stream::{Stream, StreamExt as _};
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::Channel;
use tonic::{Request, Status};

use super::auth::AUTHORIZATION;
use super::status::ApiError;
use crate::raft::NodeId;
use crate::tls::PeerTls;

pub use dispatcher_proto::headers::FORWARDED as FORWARDED_KEY;

/// Channels to leaders (and peers), by id and address.
#[derive(Clone, Default)]
pub struct Forwarder {
    channels: Arc<Mutex<HashMap<(NodeId, String), Channel>>>,
    tls: Option<PeerTls>,
}

impl Forwarder {
    /// Forwards over TLS with this replica's certificate as client identity.
    pub fn with_tls(tls: PeerTls) -> Self {
        Forwarder {
            channels: Default::default(),
            tls: Some(tls),
        }
    }

    /// A channel to replica `id` at `addr`, created lazily (no connection until the first
    /// call). With TLS the peer's certificate must be valid for `replica-<id>`.
    pub fn channel(&self, id: NodeId, addr: &str) -> Result<Channel, ApiError> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let key = (id, addr.to_string());
        if let Some(c) = channels.get(&key) {
            return Ok(c.clone());
        }
        let endpoint = crate::tls::peer_endpoint(id, addr, self.tls.as_ref())
            .map_err(|e| ApiError::Internal(format!("replica {id} at {addr:?}: {e}")))?;
        let channel = endpoint
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .connect_lazy();
        channels.insert(key, channel.clone());
        Ok(channel)
    }
}

/// Where a call is forwarded: a channel to the leader, and who that leader is.
#[derive(Clone, Debug)]
pub struct Route {
    /// The channel to the leader.
    pub channel: Channel,
    /// The leader's id and client address.
    pub leader: (NodeId, String),
}

/// Whether a status on a forwarded call was made here by tonic rather than sent by the
/// leader. tonic keeps the transport error (a connect error, an h2 reset, its own
/// `TimeoutExpired`) as the `source` of every status it makes from one; a status decoded
/// from the leader's answer has none.
pub fn failed_here(status: &Status) -> bool {
    std::error::Error::source(status).is_some()
}

/// A failure of the forward in one short line: tonic's message and the root cause of its
/// source ("tcp connect error: Connection refused (os error 111)"), instead of its nested
/// debug rendering.
pub fn describe(status: &Status) -> String {
    crate::raft::network::with_root_cause(status).unwrap_or_else(|| status.message().to_string())
}

/// A follower's failure to forward to `leader`, as the caller sees it: UNAVAILABLE with
/// the hint of the leader this replica knows now (`known`), if any.
pub fn failure(
    leader: &(NodeId, String),
    cause: &str,
    known: Option<(NodeId, String)>,
) -> ApiError {
    ApiError::ForwardFailed {
        leader: known,
        cause: format!(
            "forwarding to the leader (replica {} at {}) failed: {cause}; retry",
            leader.0, leader.1
        ),
    }
}

/// Relays the leader's stream: the leader's own statuses pass through, while a stream
/// that breaks here (the connection to the leader reset or closed) ends with UNAVAILABLE
/// and the hint of the leader it came from.
pub fn relay<T, S>(stream: S, leader: (NodeId, String)) -> impl Stream<Item = Result<T, Status>>
where
    S: Stream<Item = Result<T, Status>>,
{
    stream.map(move |item| match item {
        Err(s) if failed_here(&s) => Err(Status::from(failure(
            &leader,
            &format!("the stream broke: {}", describe(&s)),
            Some(leader.clone()),
        ))),
        other => other,
    })
}

/// Whether the request was already forwarded by another replica.
pub fn was_forwarded<T>(req: &Request<T>) -> bool {
    req.metadata().contains_key(FORWARDED_KEY)
}

/// Wraps a message for forwarding, marked, with the caller's deadline and token carried
/// over (the leader authenticates the caller again).
pub fn forwarded<T>(
    message: T,
    timeout: Option<Duration>,
    authorization: Option<&AsciiMetadataValue>,
) -> Request<T> {
    let mut req = Request::new(message);
    if let Some(value) = authorization {
        req.metadata_mut().insert(AUTHORIZATION, value.clone());
    }
    req.metadata_mut().insert(
        FORWARDED_KEY,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    if let Some(t) = timeout {
        req.set_timeout(t);
    }
    req
}

/// The deadline a client set on a request (`grpc-timeout`), if any. Like the gRPC spec
/// (and tonic), at most 8 digits; anything else is ignored rather than trusted.
pub fn deadline<T>(req: &Request<T>) -> Option<Duration> {
    let raw = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (value, unit) = raw.split_at(raw.len().checked_sub(1)?);
    if value.is_empty() || value.len() > 8 {
        return None;
    }
    let value: u64 = value.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(value.checked_mul(3600)?),
        "M" => Duration::from_secs(value.checked_mul(60)?),
        "S" => Duration::from_secs(value),
        "m" => Duration::from_millis(value),
        "u" => Duration::from_micros(value),
        "n" => Duration::from_nanos(value),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_timeout(v: &str) -> Request<()> {
        let mut r = Request::new(());
        r.metadata_mut()
            .insert("grpc-timeout", v.parse().expect("ascii"));
        r
    }

    fn hint(s: &Status) -> Option<&str> {
        s.metadata()
            .get(super::super::status::LEADER_ADDRESS_KEY)
            .and_then(|v| v.to_str().ok())
    }

    #[test]
    fn statuses_tonic_makes_here_are_told_from_the_leaders_answers() {
        // What the leader sends: decoded from its trailers, without a source.
        for sent in [
            Status::unavailable("not the leader"),
            Status::deadline_exceeded("too late"),
            Status::cancelled("cancelled by the leader"),
            Status::unknown("odd"),
        ] {
            assert!(!failed_here(&sent), "{sent:?}");
        }
        // What tonic makes here: its own deadline timer and a refused connection.
        let timeout = Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert_eq!(timeout.code(), tonic::Code::Cancelled);
        assert!(failed_here(&timeout));
        let refused = Status::from_error(Box::new(tonic::ConnectError(Box::new(
            std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        ))));
        assert_eq!(refused.code(), tonic::Code::Unavailable);
        assert!(failed_here(&refused));
        assert!(
            describe(&refused).contains("refused"),
            "{}",
            describe(&refused)
        );
    }

    #[tokio::test]
    async fn a_relayed_stream_that_breaks_here_ends_unavailable_with_the_hint() {
        let leader = (1, "127.0.0.1:7001".to_string());
        let refused = Status::from_error(Box::new(tonic::ConnectError(Box::new(
            std::io::Error::from(std::io::ErrorKind::ConnectionReset),
        ))));
        let items = vec![
            Ok(1),
            Err(Status::not_found("the leader's own answer")),
            Err(refused),
        ];
        let relayed: Vec<Result<i32, Status>> =
            relay(tokio_stream::iter(items), leader).collect().await;
        assert_eq!(relayed[0].as_ref().ok(), Some(&1));
        let own = relayed[1].as_ref().expect_err("an error");
        assert_eq!(own.code(), tonic::Code::NotFound, "passes through");
        assert_eq!(hint(own), None);
        let broke = relayed[2].as_ref().expect_err("an error");
        assert_eq!(broke.code(), tonic::Code::Unavailable);
        assert_eq!(hint(broke), Some("127.0.0.1:7001"));
        assert!(broke.message().contains("replica 1"), "{}", broke.message());
    }

    #[test]
    fn deadlines_parse_and_hostile_values_are_ignored() {
        assert_eq!(
            deadline(&with_timeout("250m")),
            Some(Duration::from_millis(250))
        );
        assert_eq!(deadline(&with_timeout("3S")), Some(Duration::from_secs(3)));
        assert_eq!(deadline(&with_timeout("18446744073709551615S")), None);
        assert_eq!(
            deadline(&with_timeout("99999999H")),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
        assert_eq!(deadline(&with_timeout("5x")), None);
        assert_eq!(deadline(&with_timeout("m")), None);
    }
}
