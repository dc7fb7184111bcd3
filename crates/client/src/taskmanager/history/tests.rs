//! Rotation of the attempt history and reading it back whole: the chaos checker proves
//! from these records that no attempt ran twice, so a reader must see every kept line,
//! once, in order.

use super::*;

/// A record of exactly `len` bytes with its newline: `n` padded with dots.
fn line(n: usize, len: usize) -> String {
    let mut s = format!("{n:04}");
    while s.len() + 1 < len {
        s.push('.');
    }
    s
}

fn lines_of(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn a_file_fills_up_to_its_limit_and_the_next_line_starts_a_new_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = History::open(dir.path(), 30, 3).expect("open");
    for n in 0..3 {
        h.append(&line(n, 10)).expect("append");
    }
    let current = dir.path().join(FILE_NAME);
    assert_eq!(std::fs::metadata(&current).expect("meta").len(), 30);
    assert!(
        !rotated(&current, 1).exists(),
        "exactly at the limit: no rotation"
    );
    h.append(&line(3, 10)).expect("append");
    assert_eq!(
        lines_of(&rotated(&current, 1)),
        vec![line(0, 10), line(1, 10), line(2, 10)]
    );
    assert_eq!(lines_of(&current), vec![line(3, 10)]);
}

#[test]
fn a_line_longer_than_the_limit_gets_a_file_of_its_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = History::open(dir.path(), 30, 3).expect("open");
    h.append(&line(0, 10)).expect("append");
    h.append(&line(1, 50)).expect("append");
    h.append(&line(2, 10)).expect("append");
    let current = dir.path().join(FILE_NAME);
    assert_eq!(lines_of(&rotated(&current, 2)), vec![line(0, 10)]);
    assert_eq!(lines_of(&rotated(&current, 1)), vec![line(1, 50)]);
    assert_eq!(lines_of(&current), vec![line(2, 10)]);
}

#[test]
fn only_the_newest_keep_files_remain() {
    let dir = tempfile::tempdir().expect("tempdir");
    // One line a file.
    let mut h = History::open(dir.path(), 10, 2).expect("open");
    for n in 0..10 {
        h.append(&line(n, 10)).expect("append");
    }
    let current = dir.path().join(FILE_NAME);
    assert_eq!(lines_of(&rotated(&current, 2)), vec![line(7, 10)]);
    assert_eq!(lines_of(&rotated(&current, 1)), vec![line(8, 10)]);
    assert_eq!(lines_of(&current), vec![line(9, 10)]);
    assert!(!rotated(&current, 3).exists());
    assert_eq!(
        read(dir.path()).expect("read"),
        vec![line(7, 10), line(8, 10), line(9, 10)]
    );
}

#[test]
fn keep_zero_keeps_only_the_current_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = History::open(dir.path(), 20, 0).expect("open");
    for n in 0..5 {
        h.append(&line(n, 10)).expect("append");
    }
    assert_eq!(read(dir.path()).expect("read"), vec![line(4, 10)]);
    assert!(!rotated(&dir.path().join(FILE_NAME), 1).exists());
}

#[test]
fn files_past_a_smaller_keep_are_dropped_at_the_next_rotation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = History::open(dir.path(), 10, 5).expect("open");
    for n in 0..6 {
        h.append(&line(n, 10)).expect("append");
    }
    drop(h);
    let current = dir.path().join(FILE_NAME);
    assert!(rotated(&current, 5).exists());
    let mut h = History::open(dir.path(), 10, 2).expect("reopen");
    h.append(&line(6, 10)).expect("append");
    assert_eq!(
        read(dir.path()).expect("read"),
        vec![line(4, 10), line(5, 10), line(6, 10)]
    );
    for n in 3..=6 {
        assert!(!rotated(&current, n).exists(), ".{n} is gone");
    }
}

#[test]
fn a_reopened_history_counts_what_is_already_there() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = History::open(dir.path(), 30, 3).expect("open");
    for n in 0..3 {
        h.append(&line(n, 10)).expect("append");
    }
    drop(h);
    let mut h = History::open(dir.path(), 30, 3).expect("reopen");
    h.append(&line(3, 10)).expect("append");
    let current = dir.path().join(FILE_NAME);
    assert_eq!(
        lines_of(&current),
        vec![line(3, 10)],
        "rotated before the line"
    );
}

#[test]
fn the_reader_returns_every_line_across_files_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Three lines a file, 34 files: more than nine, so `.10` must sort after `.9`.
    let mut h = History::open(dir.path(), 30, 100).expect("open");
    let written: Vec<String> = (0..100).map(|n| line(n, 10)).collect();
    for l in &written {
        h.append(l).expect("append");
    }
    assert!(rotated(&dir.path().join(FILE_NAME), 33).exists());
    assert_eq!(read(dir.path()).expect("read"), written);
    let records = records(dir.path());
    assert!(records.is_empty(), "none of these lines is JSON");
}

#[test]
fn records_parse_the_lines_and_skip_a_cut_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = History::open(dir.path(), 4096, 2).expect("open");
    h.append(r#"{"event":"start","attempt":1}"#)
        .expect("append");
    h.append(r#"{"event":"stop","attem"#).expect("append");
    h.append(r#"{"event":"stop","attempt":1}"#).expect("append");
    let events: Vec<String> = records(dir.path())
        .iter()
        .map(|r| r["event"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(events, ["start", "stop"]);
}

#[test]
fn no_history_reads_as_empty() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(read(dir.path()).expect("read").is_empty());
    assert!(read(&dir.path().join("missing")).expect("read").is_empty());
}

#[test]
fn a_reader_racing_the_rotation_sees_no_line_twice_and_none_missing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_path_buf();
    let total = 1000;
    let writer = std::thread::spawn(move || {
        // Five lines a file: a rotation every fifth append, paced so that reads overlap
        // the writes instead of all coming before or after them.
        let mut h = History::open(&path, 50, 10_000).expect("open");
        for n in 0..total {
            h.append(&line(n, 10)).expect("append");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    });
    let mut partial_reads = 0;
    while !writer.is_finished() {
        // A read that kept meeting rotations gives up; the others must be exact.
        let Ok(mut got) = read(dir.path()) else {
            continue;
        };
        // The line being appended at that instant may be cut short.
        if got.last().is_some_and(|l| l.len() != 9) {
            got.pop();
        }
        let numbers: Vec<usize> = got
            .iter()
            .map(|l| l.trim_end_matches('.').parse().expect("a number"))
            .collect();
        let expected: Vec<usize> = (0..numbers.len()).collect();
        assert_eq!(numbers, expected, "a prefix of what was written, in order");
        if (1..total).contains(&numbers.len()) {
            partial_reads += 1;
        }
    }
    writer.join().expect("writer");
    assert_eq!(read(dir.path()).expect("read").len(), total);
    assert!(partial_reads > 0, "no read overlapped the writes");
}

#[test]
fn a_rotation_that_fails_still_records_the_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = History::open(dir.path(), 20, 2).expect("open");
    h.append(&line(0, 10)).expect("append");
    h.append(&line(1, 10)).expect("append");
    // A directory where the oldest file should be dropped: the rotation fails.
    let current = dir.path().join(FILE_NAME);
    std::fs::create_dir_all(rotated(&current, 2).join("blocker")).expect("blocker");
    h.append(&line(2, 10))
        .expect("appended despite the failed rotation");
    assert_eq!(
        lines_of(&current),
        vec![line(0, 10), line(1, 10), line(2, 10)]
    );
}
