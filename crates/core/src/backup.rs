//! Backup files: a consistent snapshot of the replicated state, as `dispatchctl cluster
//! snapshot save` writes it and `dispatcher --restore` reads it.
//!
//! A backup is the codec encoding (format-version byte, then bincode) of [`Backup`]: the
//! state's canonical encoding, the log position it reflects and its digest, which is
//! checked on read.

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
    /// The file is not a backup this build can read.
    #[error("{path}: not a readable backup: {source}")]
    Format {
        /// The file.
        path: String,
        /// The codec's complaint.
        source: CodecError,
    },
    /// The digest does not match: the file is corrupt.
    #[error("{path}: the state does not match its digest (corrupt backup)")]
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
        let bytes = codec::encode(self).map_err(|source| BackupError::Format {
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
        let backup: Backup = codec::decode(&bytes).map_err(|source| BackupError::Format {
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
