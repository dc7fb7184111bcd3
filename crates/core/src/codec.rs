//! The one place where bytes are made: a format-version byte followed by bincode 2
//! (standard configuration, serde) of the value.
//!
//! Log entries, snapshots, the vote and the Raft RPC payloads all go through here, so the
//! encoding can be replaced (bincode is no longer maintained) by bumping
//! [`FORMAT_VERSION`] and teaching [`decode`] the old one.
//!
//! Architecture invariant: nothing else in the crate calls bincode.

use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};

/// The format written by this build. Readers refuse anything newer.
pub const FORMAT_VERSION: u8 = 1;

/// Largest value [`decode`] accepts, so that a corrupt or hostile length prefix cannot
/// make us allocate without bound.
pub const MAX_DECODE_BYTES: usize = 256 << 20;

/// Encoding or decoding failed.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The input was empty: not even a version byte.
    #[error("empty input: no format-version byte")]
    Empty,
    /// Written by a newer (or unknown) format.
    #[error("format version {found} is not supported (this build reads version {supported})")]
    UnsupportedVersion {
        /// The version byte found.
        found: u8,
        /// The version this build reads.
        supported: u8,
    },
    /// The bytes are not a valid encoding of the expected type.
    #[error("malformed encoding: {0}")]
    Malformed(String),
    /// Bytes left over after the value: a sign of a type mismatch or corruption.
    #[error("{0} trailing bytes after the encoded value")]
    Trailing(usize),
    /// The value could not be encoded.
    #[error("cannot encode: {0}")]
    Encode(String),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_DECODE_BYTES>()
}

/// Encodes a value: version byte, then bincode.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = vec![FORMAT_VERSION];
    bincode::serde::encode_into_std_write(value, &mut out, config())
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    Ok(out)
}

/// The length of [`encode`]'s output for a value, without building it (for byte
/// budgets, such as how many log entries fit in one AppendEntries).
pub fn encoded_len<T: Serialize + ?Sized>(value: &T) -> Result<usize, CodecError> {
    let mut size = bincode::enc::write::SizeWriter::default();
    bincode::serde::encode_into_writer(value, &mut size, config())
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    Ok(1 + size.bytes_written)
}

/// Decodes a value written by [`encode`], checking the version byte and that every byte
/// was consumed.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (&version, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    if version != FORMAT_VERSION {
        return Err(CodecError::UnsupportedVersion {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let (value, read) = bincode::serde::decode_from_slice(body, config())
        .map_err(|e| CodecError::Malformed(e.to_string()))?;
    if read != body.len() {
        return Err(CodecError::Trailing(body.len() - read));
    }
    Ok(value)
}

/// Lower-case hex SHA-256 of some bytes.
pub fn digest_hex(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_round_trips_behind_its_version_byte() {
        let v = (7u64, "seven".to_string(), vec![1u8, 2, 3]);
        let bytes = encode(&v).expect("encode");
        assert_eq!(bytes[0], FORMAT_VERSION);
        let back: (u64, String, Vec<u8>) = decode(&bytes).expect("decode");
        assert_eq!(back, v);
    }

    #[test]
    fn encoded_len_is_the_length_of_the_encoding() {
        let v = (7u64, "seven".repeat(100), vec![9u8; 1000]);
        assert_eq!(
            encoded_len(&v).expect("len"),
            encode(&v).expect("encode").len()
        );
    }

    #[test]
    fn newer_versions_empty_input_and_trailing_bytes_are_refused() {
        let mut bytes = encode(&1u32).expect("encode");
        bytes[0] = FORMAT_VERSION + 1;
        assert!(matches!(
            decode::<u32>(&bytes),
            Err(CodecError::UnsupportedVersion { found, .. }) if found == FORMAT_VERSION + 1
        ));
        assert!(matches!(decode::<u32>(&[]), Err(CodecError::Empty)));
        let mut bytes = encode(&1u32).expect("encode");
        bytes.push(0);
        assert!(matches!(
            decode::<u32>(&bytes),
            Err(CodecError::Trailing(1))
        ));
    }

    #[test]
    fn a_huge_length_prefix_is_refused_without_allocating_it() {
        // Version byte, then a varint length of u64::MAX for a Vec<u8>.
        let mut bytes = vec![FORMAT_VERSION, 255];
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode::<Vec<u8>>(&bytes),
            Err(CodecError::Malformed(_))
        ));
    }
}
