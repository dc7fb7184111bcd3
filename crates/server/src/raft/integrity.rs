//! What a replica checks of its own data before it serves from it, and how it refuses
//! data it cannot trust.
//!
//! Every value the replica reads back is a checked codec frame (`codec::encode_checked`:
//! CRC-32, format version, bincode); snapshot files also name the SHA-256 digest of the
//! state they hold. sled checks a CRC of every message of its own log, but it treats a
//! message that fails it during recovery as a torn write: it stops recovering there and
//! drops everything after it, silently. It also asserts (panics) on some damage. So at
//! start-up this module:
//! - opens sled under [`catch_panic`], turning a panic inside sled into a refusal;
//! - refuses sled files that lost the identity record (the first record of a directory:
//!   if it is gone, sled dropped everything from a damaged record on);
//! - reads every log entry, the vote, the committed id and the purge point back through
//!   their checks, and checks that the log has no hole and that every key holds the
//!   entry of its index;
//! - checks that the entries known committed are still there (in the log or the
//!   snapshot): a log that lost committed entries (sled dropped a "torn" tail) is refused.
//!
//! The snapshot file is checked by the state-machine store as it loads it
//! (`sm_store.rs`). Whatever fails is a [`Corruption`]: the file, what was found, and the
//! documented way back. The binary logs it as one ERROR line and exits 1.
//!
//! Must never repair, rewrite or delete anything: it only reads and refuses.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::log_store::{Identity, LogStore, OpenError};
use super::sm_store::StateMachineStore;

/// What an operator does about a replica whose data is corrupt (docs/operations.md).
pub const REMEDY: &str = "this replica will not start on data it cannot trust; \
remove it from the cluster, wipe its data directory and add it back \
(docs/operations.md, \"Replace a replica\")";

/// Data that failed its check: which file, what was found.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("corrupt data in {file}: {found}; {REMEDY}")]
pub struct Corruption {
    /// The file (or sled's directory) holding the data.
    pub file: PathBuf,
    /// What was found wrong.
    pub found: String,
}

impl Corruption {
    /// Corruption found in `file`.
    pub fn new(file: impl Into<PathBuf>, found: impl Into<String>) -> Self {
        Corruption {
            file: file.into(),
            found: found.into(),
        }
    }
}

/// Runs `f`, turning a panic inside it into `Err(message)` without printing the panic
/// (a library's assertion on a damaged file is a refusal to report, not a crash to
/// trace). Panics on other threads meanwhile still reach the previous hook.
pub fn catch_panic<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    type Hook = Box<dyn Fn(&std::panic::PanicHookInfo<'_>) + Send + Sync>;
    let previous: Arc<Hook> = Arc::new(std::panic::take_hook());
    let caught: Arc<Mutex<Option<String>>> = Arc::default();
    let me = std::thread::current().id();
    {
        let previous = previous.clone();
        let caught = caught.clone();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().id() == me {
                let message = match info.payload().downcast_ref::<&str>() {
                    Some(s) => s.to_string(),
                    None => info
                        .payload()
                        .downcast_ref::<String>()
                        .cloned()
                        .unwrap_or_else(|| "a panic".into()),
                };
                let at = info
                    .location()
                    .map(|l| format!(" (at {}:{})", l.file(), l.line()))
                    .unwrap_or_default();
                *caught.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("{message}{at}"));
            } else {
                previous(info);
            }
        }));
    }
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    let _ours = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| previous(info)));
    result.map_err(|_| {
        caught
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_else(|| "a panic".into())
    })
}

/// Opens the Raft log under `dir` and checks everything in it (see the module doc).
/// Returns the store and whether the directory was created just now.
pub async fn open_log(dir: &Path, identity: &Identity) -> Result<(LogStore, bool), OpenError> {
    // sled's data file exists once a directory was opened; the identity record is the
    // first thing written into a new one. Files without it mean sled dropped what it
    // found damaged (everything after the first bad record, silently).
    let existed = dir.join("db").exists();
    let opened = catch_panic(|| LogStore::open(dir, identity)).map_err(|panic| {
        Corruption::new(
            dir,
            format!("sled's files do not open (sled panicked: {panic})"),
        )
    })?;
    let (mut log, fresh) = opened?;
    if existed && fresh {
        return Err(Corruption::new(
            dir,
            "sled's files exist but hold no identity record: sled dropped records it found \
             damaged (the vote and log entries with them)",
        )
        .into());
    }
    log.verify().await?;
    Ok((log, fresh))
}

/// Checks that the entries the log store says were committed are still held, in the log
/// or in the snapshot: sled drops a log tail it finds damaged without an error.
pub async fn check_committed_held(
    dir: &Path,
    log: &mut LogStore,
    sm: &StateMachineStore,
) -> Result<(), OpenError> {
    use openraft::storage::RaftLogStorage;
    let committed = log
        .read_committed()
        .await
        .map_err(|e| Corruption::new(dir, format!("the committed id does not read: {e}")))?;
    let last_log = log
        .get_log_state()
        .await
        .map_err(|e| Corruption::new(dir, format!("the log state does not read: {e}")))?
        .last_log_id;
    let snapshot = sm.shared().read().last_applied;
    let held = last_log.max(snapshot);
    if let Some(c) = committed {
        if Some(c) > held {
            return Err(Corruption::new(
                dir,
                format!(
                    "entries up to index {} were committed, but the log and the snapshot end at {}: \
                     committed entries were lost",
                    c.index,
                    held.map(|h| h.index.to_string()).unwrap_or_else(|| "nothing".into())
                ),
            )
            .into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_its_message_and_the_hook_is_restored() {
        let got = catch_panic(|| -> u32 { panic!("insert_pid specified lsn") });
        let msg = got.expect_err("the panic is caught");
        assert!(msg.starts_with("insert_pid specified lsn (at "), "{msg}");
        assert_eq!(catch_panic(|| 7), Ok(7));
    }

    #[test]
    fn a_refusal_names_the_file_what_was_found_and_the_way_back() {
        let c = Corruption::new("/data/2/snapshot/current.snap", "checksum mismatch");
        let msg = c.to_string();
        assert!(
            msg.starts_with("corrupt data in /data/2/snapshot/current.snap: checksum mismatch; ")
        );
        assert!(msg.contains("remove it from the cluster, wipe its data directory and add it back"));
        assert!(msg.contains("docs/operations.md"));
        assert!(!msg.contains('\n'), "one line: {msg}");
    }
}
