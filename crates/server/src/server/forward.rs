//! Forwarding a write from a follower to the leader: one lazily connected channel per
//! leader address, reused. A forwarded request carries `x-dispatcher-forwarded`, and a
//! replica never forwards such a request again, so a stale leader hint cannot make two
//! replicas bounce a request between them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tonic::Request;

use super::status::ApiError;

pub use dispatcher_proto::headers::FORWARDED as FORWARDED_KEY;

/// Channels to leaders, by address.
#[derive(Clone, Default)]
pub struct Forwarder {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl Forwarder {
    /// A channel to `addr`, created lazily (no connection until the first call).
    pub fn channel(&self, addr: &str) -> Result<Channel, ApiError> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| ApiError::Internal(format!("leader address {addr:?}: {e}")))?
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .connect_lazy();
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }
}

/// Whether the request was already forwarded by another replica.
pub fn was_forwarded<T>(req: &Request<T>) -> bool {
    req.metadata().contains_key(FORWARDED_KEY)
}

/// Wraps a message for forwarding, marked and with the caller's deadline carried over.
pub fn forwarded<T>(message: T, timeout: Option<Duration>) -> Request<T> {
    let mut req = Request::new(message);
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
