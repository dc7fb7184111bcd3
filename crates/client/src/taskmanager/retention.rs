//! How long the task directories of ended attempts stay: [`Retention`] decides, from the
//! order in which attempts ended and when, which directories go; [`dispose`] and
//! [`ended_dirs`] are the file-system side.
//!
//! A directory is removed once its attempt ended longer ago than the retention, or when
//! more ended directories are kept than the retained count (the oldest go first). The
//! directory of a running attempt is never a candidate: only [`Retention::ended`] adds
//! one, and [`Retention::started`] withdraws it when the same attempt runs again (after
//! the agent registered afresh). Directories found at start-up are ended ones (no task
//! runs before the agent starts any, and the orphans of a previous life are killed
//! first), aged by their modification time, which the agent sets when an attempt ends.
//!
//! Removal first renames a directory to a hidden name in the same parent, then deletes
//! it off the agent's task: a new attempt that reuses the name at once gets a fresh
//! directory, and a tree of any size never stalls the agent. Hidden leftovers of a crash
//! mid-removal are deleted at the next start.

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The prefix of a directory being removed. Task directory names never start with a dot
/// (see [`super::runner::AttemptKey::file_name`]).
const REMOVING: &str = ".removing-";

/// The ended task directories, in the order their attempts ended.
#[derive(Debug, Clone)]
pub struct Retention {
    max_age_ms: u64,
    max_count: usize,
    ended: VecDeque<(u64, PathBuf)>,
}

impl Retention {
    /// Keeps ended directories for `max_age` and at most `max_count` of them.
    pub fn new(max_age: Duration, max_count: usize) -> Self {
        Retention {
            max_age_ms: u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX),
            max_count,
            ended: VecDeque::new(),
        }
    }

    /// The attempt whose directory is `dir` ended at `at_ms` (wall clock). Ends come in
    /// order; a directory is listed once, as its attempt starts again only after
    /// [`Retention::started`] withdrew it.
    pub fn ended(&mut self, at_ms: u64, dir: PathBuf) {
        self.ended.push_back((at_ms, dir));
    }

    /// An attempt starts in `dir`: it is no longer an ended directory.
    pub fn started(&mut self, dir: &Path) {
        self.ended.retain(|(_, d)| d != dir);
    }

    /// How many ended directories are kept now.
    pub fn len(&self) -> usize {
        self.ended.len()
    }

    /// Whether no ended directory is kept.
    pub fn is_empty(&self) -> bool {
        self.ended.is_empty()
    }

    /// The directories to remove at `now_ms`, oldest first; they are forgotten. A clock
    /// that went backwards makes an entry young, never due early.
    pub fn due(&mut self, now_ms: u64) -> Vec<PathBuf> {
        let mut out = Vec::new();
        while let Some((at, _)) = self.ended.front() {
            let expired = now_ms.saturating_sub(*at) >= self.max_age_ms;
            if !expired && self.ended.len() <= self.max_count {
                break;
            }
            if let Some((_, dir)) = self.ended.pop_front() {
                out.push(dir);
            }
        }
        out
    }
}

fn mtime_ms(meta: &std::fs::Metadata) -> u64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The task directories under `tasks_dir` as `(ended at, dir)`, oldest first, for a
/// [`Retention`] at start-up. Leftovers of an interrupted removal are deleted here.
pub fn ended_dirs(tasks_dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let entries = match std::fs::read_dir(tasks_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if entry.file_name().to_string_lossy().starts_with(REMOVING) {
            remove(&path);
        } else if meta.is_dir() {
            out.push((mtime_ms(&meta), path));
        }
    }
    out.sort();
    Ok(out)
}

/// Marks `dir` as ended now (its modification time), so that a restarted agent ages it
/// from its end rather than its start. Best effort: a directory that cannot be touched
/// only ages from its last change.
pub fn mark_ended(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.set_modified(SystemTime::now());
    }
}

/// Distinguishes the hidden names of directories removed by this process.
static REMOVALS: AtomicU64 = AtomicU64::new(0);

/// Removes `dirs`: each is renamed to a hidden name at once, then deleted on a blocking
/// thread of the runtime (here, outside one). A directory that is already gone is skipped; one that cannot
/// be removed is logged and left.
pub fn dispose(dirs: Vec<PathBuf>) {
    let mut hidden = Vec::new();
    for dir in dirs {
        let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
            continue;
        };
        let n = REMOVALS.fetch_add(1, Ordering::Relaxed);
        let to = parent.join(format!(
            "{REMOVING}{}-{n}-{}",
            std::process::id(),
            name.to_string_lossy()
        ));
        match std::fs::rename(&dir, &to) {
            Ok(()) => hidden.push(to),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot remove an ended task directory");
            }
        }
    }
    if hidden.is_empty() {
        return;
    }
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => {
            rt.spawn_blocking(move || hidden.iter().for_each(|d| remove(d)));
        }
        Err(_) => hidden.iter().for_each(|d| remove(d)),
    }
}

/// Deletes a directory tree (without following links in it), logging a failure.
fn remove(path: &Path) {
    match std::fs::remove_dir_all(path) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(dir = %path.display(), error = %e, "cannot remove an ended task directory");
        }
    }
}

#[cfg(test)]
mod tests;
