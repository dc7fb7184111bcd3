//! The attempt history, `<work-dir>/attempts.jsonl`: one JSON object a line for every
//! attempt the agent starts and stops (the TaskManager side of the chaos checker's
//! history), bounded in bytes by rotation.
//!
//! [`History`] appends; when a line would take the file past its byte limit, the file
//! becomes `attempts.jsonl.1`, the former `.1` becomes `.2`, and so on up to `.keep`;
//! older files are deleted. [`read`] returns every line still on disk, oldest first,
//! across the rotated files, so a reader loses nothing that was kept. Lines are never
//! split across files and their format is unchanged, so an old reader of
//! `attempts.jsonl` alone still parses it (it just sees the newest part).
//!
//! This module never decides what a line says; the agent writes the records.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

/// The current file's name in the work directory.
pub const FILE_NAME: &str = "attempts.jsonl";

/// The appending side: the current file and its rotation.
#[derive(Debug)]
pub struct History {
    path: PathBuf,
    /// `None` after a rotation that could not reopen the file; the next append retries.
    file: Option<File>,
    /// Bytes in the current file, as far as this writer knows.
    size: u64,
    max_bytes: u64,
    keep: u32,
}

/// The path of rotated file `n` (1 is the newest) of `path`.
fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl History {
    /// Opens (creating it) `<work_dir>/attempts.jsonl`, rotated once it would exceed
    /// `max_bytes`, keeping `keep` rotated files.
    pub fn open(work_dir: &Path, max_bytes: u64, keep: u32) -> std::io::Result<Self> {
        let path = work_dir.join(FILE_NAME);
        let file = open_append(&path)?;
        let size = file.metadata()?.len();
        Ok(History {
            path,
            file: Some(file),
            size,
            max_bytes,
            keep,
        })
    }

    /// Appends one record (`line` without its newline), rotating first if the line would
    /// take the file past the limit. A line longer than the limit gets a file of its own.
    /// A failed rotation is logged and the record still appended.
    pub fn append(&mut self, line: &str) -> std::io::Result<()> {
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        let len = bytes.len() as u64;
        if self.size > 0 && self.size.saturating_add(len) > self.max_bytes {
            if let Err(e) = self.rotate() {
                // A record matters more than the bound: keep appending to the current
                // file, and try again once it grew by another `max_bytes`.
                tracing::warn!(file = %self.path.display(), error = %e, "cannot rotate the attempt history; appending to it");
                self.size = 0;
            }
        }
        let file = match &mut self.file {
            Some(f) => f,
            None => {
                let f = open_append(&self.path)?;
                self.size = f.metadata()?.len();
                self.file.insert(f)
            }
        };
        // One write: an append-mode write of a line lands whole, after any other.
        file.write_all(&bytes)?;
        self.size += len;
        Ok(())
    }

    /// Shifts `.1..` up by one, drops what falls past `keep` (files left by a run with a
    /// larger `keep` too, or they would never go), and starts a new file.
    fn rotate(&mut self) -> std::io::Result<()> {
        self.file = None;
        let mut older = rotated_files(&self.path)?;
        // Highest first, so that no rename lands on a file not yet moved.
        older.sort_by_key(|f| std::cmp::Reverse(f.0));
        for (n, path) in older {
            if n >= self.keep {
                remove_if_present(&path)?;
            } else {
                rename_if_present(&path, &rotated(&self.path, n + 1))?;
            }
        }
        if self.keep == 0 {
            remove_if_present(&self.path)?;
        } else {
            rename_if_present(&self.path, &rotated(&self.path, 1))?;
        }
        let file = open_append(&self.path)?;
        self.size = file.metadata()?.len();
        self.file = Some(file);
        Ok(())
    }
}

fn rename_if_present(from: &Path, to: &Path) -> std::io::Result<()> {
    match std::fs::rename(from, to) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// The rotated files of `path` (`path.N`), as `(N, path)`, in no particular order.
fn rotated_files(path: &Path) -> std::io::Result<Vec<(u32, PathBuf)>> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok(Vec::new());
    };
    let mut prefix = name.to_owned();
    prefix.push(".");
    let prefix = prefix.to_string_lossy().into_owned();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        let file_name = entry.file_name();
        let Some(n) = file_name
            .to_str()
            .and_then(|f| f.strip_prefix(prefix.as_str()))
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if n > 0 {
            out.push((n, entry.path()));
        }
    }
    Ok(out)
}

/// The history files of `work_dir`, oldest first (`.N` down to `.1`, then the current
/// file), each with its inode, which tells a reader whether a rotation happened.
fn files(work_dir: &Path) -> std::io::Result<Vec<(PathBuf, u64)>> {
    use std::os::unix::fs::MetadataExt;
    let current = work_dir.join(FILE_NAME);
    let mut rotated = rotated_files(&current)?;
    rotated.sort_by_key(|f| std::cmp::Reverse(f.0));
    let mut out = Vec::new();
    for path in rotated.into_iter().map(|(_, p)| p).chain([current]) {
        match std::fs::metadata(&path) {
            Ok(m) => out.push((path, m.ino())),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// How often [`read`] starts over when a rotation happens while it reads.
const READ_TRIES: usize = 20;

/// Every history line of `work_dir` still on disk, oldest first, across the rotated files
/// (none when there is no history). A rotation while reading would make a line appear
/// twice or not at all, so the read starts over until the set of files stayed the same
/// from start to end. A line being appended at that moment may come back cut short:
/// readers skip lines that do not parse.
pub fn read(work_dir: &Path) -> std::io::Result<Vec<String>> {
    for _ in 0..READ_TRIES {
        let before = files(work_dir)?;
        let mut lines = Vec::new();
        let mut complete = true;
        for (path, _) in &before {
            match std::fs::read(path) {
                Ok(bytes) => {
                    lines.extend(String::from_utf8_lossy(&bytes).lines().map(str::to_string))
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    complete = false;
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        if complete && files(work_dir)? == before {
            return Ok(lines);
        }
    }
    Err(std::io::Error::other(format!(
        "{}: the history rotated during each of {READ_TRIES} reads",
        work_dir.join(FILE_NAME).display()
    )))
}

/// The records of [`read`] that parse as JSON, oldest first; none when there is no
/// history or it cannot be read.
pub fn records(work_dir: &Path) -> Vec<serde_json::Value> {
    read(work_dir)
        .unwrap_or_default()
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[cfg(test)]
mod tests;
