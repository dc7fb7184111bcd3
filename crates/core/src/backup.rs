//! Backup files: a consistent snapshot of the replicated state, as `dispatchctl cluster
//! snapshot save` writes it and `dispatcher --restore` reads it.
//!
//! A backup is the checked codec frame (`codec::encode_checked`: a CRC-32 of the whole,
//! then the format-version byte and bincode) of [`Backup`]: the state's canonical
//! encoding, the log position it reflects and its digest. Reading checks the CRC (any
//! changed byte), then the digest (the state is the one it names), then that the state
//! decodes. Backups written before the CRC (bare codec encoding) are still read, checked
//! by their digest.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::codec::{self, CodecError};
use crate::state::DispatcherState;

/// A backup of the replicated state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backup {
    /// Raft log index the state reflects.
    pub last_log_index: u64,
    /// Term of that entry.
    pub last_log_term: u64,
    /// SHA-256 of `state`, hex.
    pub digest: String,
    /// The state's canonical encoding.
    pub state: Vec<u8>,
}

/// A backup file cannot be written or used.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not a backup this build can read, or its checksum does not match.
    #[error(
        "{path}: not a readable backup ({source}); it is damaged or not a backup: use another copy"
    )]
    Format {
        /// The file.
        path: String,
        /// The codec's complaint.
        source: CodecError,
    },
    /// The digest does not match: the file is corrupt.
    #[error("{path}: the state does not match its digest (corrupt backup): use another copy")]
    Corrupt {
        /// The file.
        path: String,
    },
}

impl Backup {
    /// A backup of `state` bytes at a log position.
    pub fn new(state: Vec<u8>, last_log_index: u64, last_log_term: u64) -> Self {
        Backup {
            last_log_index,
            last_log_term,
            digest: codec::digest_hex(&state),
            state,
        }
    }

    /// Writes the backup atomically (temporary file, fsync, rename).
    pub fn write(&self, path: &Path) -> Result<(), BackupError> {
        use std::io::Write;
        let name = path.display().to_string();
        let io = |source| BackupError::Io {
            path: name.clone(),
            source,
        };
        let bytes = codec::encode_checked(self).map_err(|source| BackupError::Format {
            path: name.clone(),
            source,
        })?;
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Reads and verifies a backup: the digest matches and the state decodes.
    pub fn read(path: &Path) -> Result<Backup, BackupError> {
        let name = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| BackupError::Io {
            path: name.clone(),
            source,
        })?;
        let backup: Backup =
            codec::decode_checked(&bytes).map_err(|source| BackupError::Format {
                path: name.clone(),
                source,
            })?;
        if codec::digest_hex(&backup.state) != backup.digest {
            return Err(BackupError::Corrupt { path: name });
        }
        DispatcherState::restore(&backup.state)
            .map_err(|source| BackupError::Format { path: name, source })?;
        Ok(backup)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::ClusterConfig;

    fn sample(dir: &Path) -> (std::path::PathBuf, Backup) {
        let state = DispatcherState::new(ClusterConfig::default())
            .encode()
            .expect("encode");
        let backup = Backup::new(state, 12, 3);
        let path = dir.join("b.backup");
        backup.write(&path).expect("write");
        (path, backup)
    }

    #[test]
    fn a_backup_round_trips_and_names_its_digest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, backup) = sample(dir.path());
        let back = Backup::read(&path).expect("read");
        assert_eq!(back, backup);
        let state = DispatcherState::restore(&back.state).expect("restore");
        assert_eq!(state.digest().expect("digest"), back.digest);
    }

    #[test]
    fn every_flipped_byte_of_a_backup_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, _) = sample(dir.path());
        let good = std::fs::read(&path).expect("read");
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x04;
            std::fs::write(&path, &bad).expect("write");
            let err = Backup::read(&path).expect_err("a flipped byte is refused");
            let msg = err.to_string();
            assert!(msg.starts_with(&path.display().to_string()), "{msg}");
            assert!(msg.contains("another copy"), "{msg}");
        }
        std::fs::write(&path, &good[..good.len() / 2]).expect("write");
        assert!(
            Backup::read(&path).is_err(),
            "a truncated backup is refused"
        );
    }

    #[test]
    fn a_backup_written_before_checksums_still_reads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, backup) = sample(dir.path());
        std::fs::write(&path, codec::encode(&backup).expect("old encoding")).expect("write");
        assert_eq!(Backup::read(&path).expect("old backup"), backup);
        // The digest still guards the state of an old backup.
        let mut tampered = backup.clone();
        if let Some(b) = tampered.state.last_mut() {
            *b ^= 1;
        }
        std::fs::write(&path, codec::encode(&tampered).expect("old encoding")).expect("write");
        assert!(matches!(
            Backup::read(&path),
            Err(BackupError::Corrupt { .. })
        ));
    }
}
