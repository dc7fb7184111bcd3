//! Which ended task directories go and when, and that removing them touches nothing
//! else.

use super::*;
use std::time::Instant;

fn dir(name: &str) -> PathBuf {
    PathBuf::from("/work/tasks").join(name)
}

#[test]
fn an_ended_directory_goes_once_it_is_older_than_the_retention() {
    let mut r = Retention::new(Duration::from_secs(1), 10);
    r.ended(0, dir("a"));
    r.ended(100, dir("b"));
    r.ended(200, dir("c"));
    assert!(r.due(999).is_empty());
    assert_eq!(r.due(1000), vec![dir("a")]);
    assert!(r.due(1099).is_empty());
    assert_eq!(r.due(1200), vec![dir("b"), dir("c")]);
    assert!(r.is_empty());
}

#[test]
fn past_the_count_the_oldest_ended_directories_go_first() {
    let mut r = Retention::new(Duration::from_secs(3600), 2);
    for (at, name) in [(0, "a"), (1, "b"), (2, "c"), (3, "d")] {
        r.ended(at, dir(name));
    }
    assert_eq!(r.due(10), vec![dir("a"), dir("b")]);
    assert_eq!(r.len(), 2);
    assert!(r.due(10).is_empty());
}

#[test]
fn zero_retention_or_zero_count_removes_at_once() {
    let mut by_age = Retention::new(Duration::ZERO, 1000);
    by_age.ended(50, dir("a"));
    assert_eq!(by_age.due(50), vec![dir("a")]);
    let mut by_count = Retention::new(Duration::from_secs(3600), 0);
    by_count.ended(50, dir("a"));
    assert_eq!(by_count.due(50), vec![dir("a")]);
}

#[test]
fn a_directory_in_use_again_is_never_due() {
    let mut r = Retention::new(Duration::ZERO, 0);
    r.ended(0, dir("a"));
    r.ended(0, dir("b"));
    // The same attempt starts again in `a` (the agent registered afresh).
    r.started(&dir("a"));
    assert_eq!(r.due(u64::MAX), vec![dir("b")]);
    r.ended(5, dir("a"));
    assert_eq!(r.due(5), vec![dir("a")]);
}

#[test]
fn a_clock_gone_backwards_keeps_a_directory_rather_than_removing_it_early() {
    let mut r = Retention::new(Duration::from_secs(1), 10);
    r.ended(5_000, dir("a"));
    assert!(r.due(1_000).is_empty());
    assert_eq!(r.due(6_000), vec![dir("a")]);
}

fn set_mtime(path: &Path, ms: u64) {
    let f = std::fs::File::open(path).expect("open");
    f.set_modified(UNIX_EPOCH + Duration::from_millis(ms))
        .expect("set mtime");
}

#[test]
fn directories_found_at_start_are_aged_by_their_modification_time() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let tasks = tmp.path().join("tasks");
    for (name, ms) in [("new", 3_000_000), ("old", 1_000_000), ("mid", 2_000_000)] {
        std::fs::create_dir_all(tasks.join(name).join("sub")).expect("dir");
        set_mtime(&tasks.join(name), ms);
    }
    std::fs::write(tasks.join("stray-file"), "x").expect("file");
    let leftover = tasks.join(".removing-1-0-gone");
    std::fs::create_dir_all(leftover.join("deep")).expect("leftover");
    let found = ended_dirs(&tasks).expect("scan");
    assert_eq!(
        found,
        vec![
            (1_000_000, tasks.join("old")),
            (2_000_000, tasks.join("mid")),
            (3_000_000, tasks.join("new")),
        ]
    );
    assert!(!leftover.exists(), "an interrupted removal is finished");
    assert!(ended_dirs(&tmp.path().join("none"))
        .expect("scan")
        .is_empty());
}

#[test]
fn marking_a_directory_ended_makes_it_young_again() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path().join("t");
    std::fs::create_dir(&d).expect("dir");
    set_mtime(&d, 1_000);
    mark_ended(&d);
    let [(at, _)] = ended_dirs(tmp.path()).expect("scan")[..] else {
        panic!("one directory expected");
    };
    let now = dispatcher_proto::wall_clock_ms();
    assert!(now.abs_diff(at) < 60_000, "marked {at}, now {now}");
}

#[tokio::test]
async fn disposing_frees_the_name_at_once_and_deletes_the_tree_without_following_links() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let tasks = tmp.path().join("tasks");
    let outside = tmp.path().join("precious");
    std::fs::write(&outside, "keep me").expect("outside");
    let d = tasks.join("job-v-0-a1-0123456789abcdef");
    std::fs::create_dir_all(d.join("nested/deeper")).expect("tree");
    std::fs::write(d.join("stdout.log"), "out").expect("log");
    std::os::unix::fs::symlink(&outside, d.join("link")).expect("link");
    std::os::unix::fs::symlink(tmp.path(), d.join("dirlink")).expect("dir link");
    let kept = tasks.join("running");
    std::fs::create_dir_all(&kept).expect("running dir");

    dispose(vec![d.clone(), tasks.join("already-gone")]);
    assert!(!d.exists(), "the name is free as soon as dispose returns");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<String> = std::fs::read_dir(&tasks)
            .expect("tasks")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        if left == ["running"] {
            break;
        }
        assert!(Instant::now() < deadline, "not removed: {left:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        std::fs::read_to_string(&outside).expect("outside"),
        "keep me"
    );
    assert!(kept.is_dir());
}
