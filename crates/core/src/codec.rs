//! The one place where bytes are made: a format-version byte followed by bincode 2
//! (standard configuration, serde) of the value.
//!
//! Log entries, snapshots, the vote and the Raft RPC payloads all go through here, so the
//! encoding can be replaced (bincode is no longer maintained) by bumping
//! [`FORMAT_VERSION`] and teaching [`decode`] the old one.
//!
//! What is stored on disk and read back (log entries, the vote and the other Raft
//! metadata, snapshot files, backups) is written with [`encode_checked`]: a frame of
//! [`CHECKED_MARK`], the CRC-32 of the rest, then the [`encode`]d value. [`decode_checked`]
//! refuses a frame whose checksum does not match, and still reads a bare [`encode`]d
//! value (what builds before the checksums wrote), so an upgrade needs no wipe. The
//! canonical encoding of the state (and so its digest) and the RPC payloads stay bare.
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
    /// A checked frame's bytes do not match its checksum: they changed after writing.
    #[error("checksum mismatch: the value was written with CRC-32 {stored:08x}, its bytes now give {computed:08x}")]
    Checksum {
        /// The checksum written with the value.
        stored: u32,
        /// The checksum of the bytes read back.
        computed: u32,
    },
    /// A checked frame too short to hold its checksum.
    #[error("truncated checked frame of {0} bytes")]
    Truncated(usize),
}

/// First byte of a checked frame ([`encode_checked`]). Format versions count up from 1
/// and will never reach it, so a frame and a bare encoding cannot be confused.
pub const CHECKED_MARK: u8 = 0xC5;

/// Bytes a checked frame adds before the encoded value: the mark and the CRC-32.
pub const CHECKED_HEADER: usize = 5;

/// Encodes a value for storage: [`CHECKED_MARK`], the CRC-32 (little-endian) of the
/// [`encode`]d value, then that encoding.
pub fn encode_checked<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = vec![CHECKED_MARK, 0, 0, 0, 0, FORMAT_VERSION];
    bincode::serde::encode_into_std_write(value, &mut out, config())
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    let crc = crc32fast::hash(&out[CHECKED_HEADER..]);
    out[1..CHECKED_HEADER].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Whether these bytes are a checked frame (as opposed to a bare [`encode`]d value
/// written before checksums existed).
pub fn is_checked(bytes: &[u8]) -> bool {
    bytes.first() == Some(&CHECKED_MARK)
}

/// Verifies a checked frame's checksum and returns the encoded value inside it; bytes
/// that are not a frame (a bare [`encode`]d value of an older build) are returned as
/// they are, unchecked.
pub fn verify_checked(bytes: &[u8]) -> Result<&[u8], CodecError> {
    if !is_checked(bytes) {
        return Ok(bytes);
    }
    let (Some(crc), Some(inner)) = (bytes.get(1..CHECKED_HEADER), bytes.get(CHECKED_HEADER..))
    else {
        return Err(CodecError::Truncated(bytes.len()));
    };
    let mut stored = [0u8; 4];
    stored.copy_from_slice(crc);
    let stored = u32::from_le_bytes(stored);
    let computed = crc32fast::hash(inner);
    if stored != computed {
        return Err(CodecError::Checksum { stored, computed });
    }
    Ok(inner)
}

/// Decodes what [`encode_checked`] wrote, refusing a checksum mismatch; also reads a bare
/// [`encode`]d value (data written before checksums), which it cannot check.
pub fn decode_checked<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    decode(verify_checked(bytes)?)
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

/// How many bytes [`encode`] would write for a value after its version byte, counted
/// without keeping them. Deterministic: it depends on the value and the type only.
pub fn encoded_len<T: Serialize + ?Sized>(value: &T) -> Result<u64, CodecError> {
    struct Count(u64);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 = self.0.saturating_add(buf.len() as u64);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    bincode::serde::encode_into_std_write(value, &mut count, config())
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    Ok(count.0)
}

/// Reads, in order, values that one [`encode`] wrote as a sequence (a struct's fields are
/// encoded one after the other), so that a layout which appends fields at its end can be
/// read without knowing in advance how many were appended: read the fields every layout
/// has, ask [`Reader::is_empty`], read the next block, and [`Reader::finish`].
pub struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Checks the version byte and positions the reader after it.
    pub fn new(bytes: &'a [u8]) -> Result<Self, CodecError> {
        let (&version, body) = bytes.split_first().ok_or(CodecError::Empty)?;
        if version != FORMAT_VERSION {
            return Err(CodecError::UnsupportedVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        Ok(Reader { rest: body })
    }

    /// Decodes the next value.
    pub fn read<T: DeserializeOwned>(&mut self) -> Result<T, CodecError> {
        let (value, read) = bincode::serde::decode_from_slice(self.rest, config())
            .map_err(|e| CodecError::Malformed(e.to_string()))?;
        self.rest = self.rest.get(read..).unwrap_or_default();
        Ok(value)
    }

    /// Whether every byte has been read.
    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// Ends the reading; bytes left over are an error, as in [`decode`].
    pub fn finish(self) -> Result<(), CodecError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(CodecError::Trailing(self.rest.len()))
        }
    }
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
    fn encoded_len_counts_what_encode_writes() {
        let v = (7u64, "seven".to_string(), vec![1u8; 300]);
        let bytes = encode(&v).expect("encode");
        assert_eq!(encoded_len(&v).expect("len"), bytes.len() as u64 - 1);
    }

    #[test]
    fn a_reader_reads_a_struct_field_by_field_and_refuses_leftovers() {
        let bytes = encode(&(5u32, "tail".to_string())).expect("encode");
        let mut r = Reader::new(&bytes).expect("version");
        assert_eq!(r.read::<u32>().expect("first"), 5);
        assert!(!r.is_empty());
        assert_eq!(r.read::<String>().expect("second"), "tail");
        assert!(r.is_empty());
        r.finish().expect("all read");

        let mut r = Reader::new(&bytes).expect("version");
        r.read::<u32>().expect("first");
        assert!(matches!(r.finish(), Err(CodecError::Trailing(5))));
        assert!(matches!(
            Reader::new(&[FORMAT_VERSION + 1]),
            Err(CodecError::UnsupportedVersion { .. })
        ));
    }

    #[test]
    fn a_checked_frame_round_trips_and_refuses_any_flipped_byte() {
        let v = (7u64, "seven".to_string(), vec![1u8, 2, 3]);
        let bytes = encode_checked(&v).expect("encode");
        assert_eq!(bytes[0], CHECKED_MARK);
        assert_eq!(
            &bytes[CHECKED_HEADER..],
            encode(&v).expect("bare").as_slice()
        );
        let back: (u64, String, Vec<u8>) = decode_checked(&bytes).expect("decode");
        assert_eq!(back, v);
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut bad = bytes.clone();
                bad[i] ^= 1 << bit;
                assert!(
                    decode_checked::<(u64, String, Vec<u8>)>(&bad).is_err(),
                    "byte {i} bit {bit} flipped was not noticed"
                );
            }
        }
    }

    #[test]
    fn a_checksum_mismatch_and_a_truncated_frame_say_what_was_found() {
        let mut bytes = encode_checked(&42u64).expect("encode");
        let last = bytes.len() - 1;
        bytes[last] ^= 0x10;
        let err = decode_checked::<u64>(&bytes).expect_err("flipped");
        assert!(matches!(err, CodecError::Checksum { .. }));
        assert!(err.to_string().starts_with("checksum mismatch"), "{err}");
        assert!(matches!(
            decode_checked::<u64>(&[CHECKED_MARK, 1, 2]),
            Err(CodecError::Truncated(3))
        ));
    }

    #[test]
    fn a_bare_value_of_an_older_build_still_decodes() {
        let v = ("old".to_string(), 9u32);
        let bare = encode(&v).expect("encode");
        assert!(!is_checked(&bare));
        let back: (String, u32) = decode_checked(&bare).expect("old format");
        assert_eq!(back, v);
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
