//! Forwarding a write from a follower to the leader: one lazily connected channel per
//! leader address, reused. A forwarded request carries `x-dispatcher-forwarded`, and a
//! replica never forwards such a request again, so a stale leader hint cannot make two
//! replicas bounce a request between them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::metadata::AsciiMetadataValue;
use tonic::transport::Channel;
use tonic::Request;

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
