//! Attempt names and the orphan sweep: two attempts never share a directory or a pid
//! file, and a restarted agent kills what its pid files name, whichever version wrote
//! them.

use super::*;
use std::collections::BTreeSet;
use std::time::Instant;

fn key(job: &str, vertex: &str, subtask: u32, attempt: u32) -> AttemptKey {
    AttemptKey {
        job: job.into(),
        vertex: vertex.into(),
        subtask,
        attempt,
    }
}

#[test]
fn names_differ_whenever_the_attempts_differ_even_if_they_read_alike() {
    let keys = [
        key("j", "a.b", 0, 1),
        key("j", "a/b", 0, 1),
        key("j", "a_b", 0, 1),
        key("j", "a b", 0, 1),
        key("j", "a\u{e9}b", 0, 1),
        // `-` separates the fields and may be part of them.
        key("x-y", "z", 0, 1),
        key("x", "y-z", 0, 1),
        key("j", "v-1", 2, 1),
        key("j", "v", 1, 2),
        key("j", "v", 12, 1),
        key("j", "v", 1, 21),
        // Alike in their first READABLE_LEN characters.
        key("j", &format!("{}1", "v".repeat(READABLE_LEN)), 0, 1),
        key("j", &format!("{}2", "v".repeat(READABLE_LEN)), 0, 1),
    ];
    let names: BTreeSet<String> = keys.iter().map(AttemptKey::file_name).collect();
    assert_eq!(names.len(), keys.len(), "{names:#?}");
    let dirs: BTreeSet<PathBuf> = keys.iter().map(|k| k.task_dir(Path::new("t"))).collect();
    let pids: BTreeSet<PathBuf> = keys.iter().map(|k| k.pid_file(Path::new("p"))).collect();
    assert_eq!((dirs.len(), pids.len()), (keys.len(), keys.len()));
}

#[test]
fn a_name_is_stable_readable_safe_and_short() {
    let k = key("job-1", "a.b", 3, 2);
    assert_eq!(
        k.file_name(),
        k.clone().file_name(),
        "the same attempt, the same name"
    );
    assert!(
        k.file_name().starts_with("job-1-a_b-3-a2-"),
        "{}",
        k.file_name()
    );
    for k in [
        key("../../etc", "/", 0, 1),
        key("j", ".", 0, 1),
        key("j", &"\u{1F600}/..".repeat(500), u32::MAX, u32::MAX),
    ] {
        let name = k.file_name();
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "{name}"
        );
        assert!(name.len() + ".pid".len() <= 200, "{} bytes", name.len());
        assert_eq!(
            k.task_dir(Path::new("/w/tasks")).parent(),
            Some(Path::new("/w/tasks"))
        );
    }
}

/// A process in a process group of its own, as a task runs.
fn spawn_group_leader() -> std::process::Child {
    use std::os::unix::process::CommandExt;
    std::process::Command::new("sleep")
        .arg("60")
        .process_group(0)
        .spawn()
        .expect("spawn sleep")
}

fn wait_exit(child: &mut std::process::Child) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if child.try_wait().expect("try_wait").is_some() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

#[test]
fn orphans_are_killed_from_pid_files_of_the_new_and_the_old_naming() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pids = tmp.path().join("pids");
    std::fs::create_dir(&pids).expect("pids");
    let mut new_style = spawn_group_leader();
    let mut old_style = spawn_group_leader();
    write_pid_file(&key("j", "a.b", 0, 1).pid_file(&pids), new_style.id()).expect("pid file");
    // As an earlier version named it: no hash.
    write_pid_file(&pids.join("j-a_b-0-a1.pid"), old_style.id()).expect("old pid file");
    // A pid now used by another process (a different start time): left alone.
    let mut unrelated = spawn_group_leader();
    std::fs::write(pids.join("j-v-0-a1.pid"), format!("{} 1\n", unrelated.id()))
        .expect("stale pid file");

    assert_eq!(kill_orphans(&pids), 2);
    assert!(
        wait_exit(&mut new_style),
        "the orphan named by the new scheme dies"
    );
    assert!(
        wait_exit(&mut old_style),
        "the orphan named by the old scheme dies"
    );
    assert!(
        unrelated.try_wait().expect("try_wait").is_none(),
        "a reused pid is not killed"
    );
    assert_eq!(
        std::fs::read_dir(&pids).expect("pids").count(),
        0,
        "every pid file is removed"
    );
    let _ = unrelated.kill();
    let _ = unrelated.wait();
}
